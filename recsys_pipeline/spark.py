"""Spark sessions configured from the pipeline config, and the driver's class archive."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib.machinery import PathFinder
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_pipeline.config import PROJECT_ROOT, PipelineConfig
from recsys_pipeline.files import write_json

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Spark's log settings reach the driver as a JVM option, not through SPARK_CONF_DIR: Spark puts that
# folder on the driver's class path, and the JDK archives no classes for a class path holding a folder
# with files in it (see class_archive).
LOG_SETTINGS = PROJECT_ROOT / "conf" / "spark" / "log4j2.properties"
DRIVER_OPTIONS = "spark.driver.extraJavaOptions"


def spark_session(
    config: PipelineConfig, app_name: str, master: str | None = None, refresh: bool = False
) -> SparkSession:
    """Get or create a session, with the settings of a refresh's job when ``refresh``
    (:meth:`~recsys_pipeline.config.SparkConfig.job_conf`).

    Under ``spark-submit`` the master comes from the submit command (``master=None``);
    in-process callers such as tests and benchmarks pass ``config.spark.master``.
    """
    conf = config.spark.job_conf(refresh)
    # Imported here: a Spark task's Airflow side takes its driver's options from this module, and
    # Airflow imports that side wherever it parses the DAG files.
    from pyspark.sql import SparkSession

    # Executors must run the same interpreter (and so the same packages) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    # Event logs let Spark's history server replay any stage's run; a deployment's own setting wins.
    if "spark.eventLog.enabled" not in conf:
        events = config.state_home / "spark-events"
        events.mkdir(parents=True, exist_ok=True)
        builder = builder.config("spark.eventLog.enabled", "true").config(
            "spark.eventLog.dir", events.as_uri()
        )
    for key, value in conf.items():
        builder = builder.config(key, value)
    # Under spark-submit the driver's JVM runs already: the submit command carries these options.
    builder = builder.config(
        DRIVER_OPTIONS, driver_java_options(conf.get(DRIVER_OPTIONS, ""), class_archive())
    )
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        # Standard UTC-adjusted Parquet timestamps (not legacy INT96), so Arrow readers agree with Spark.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


class SessionOnDemand:
    """A Spark session started when a stage first uses it (any attribute: ``read``,
    ``sparkContext``...), for the stages of one application: a run whose stages all find their input
    small enough for the driver (a night's events, :mod:`recsys_pipeline.driver_ingest`) starts no
    Spark context, and pays none of its start-up (1-2 s) or first job's warm-up."""

    def __init__(self, start: Callable[[], SparkSession]) -> None:
        self._start = start
        self._session: SparkSession | None = None

    def __getattr__(self, name: str) -> Any:
        if self._session is None:
            self._session = self._start()
        return getattr(self._session, name)

    @property
    def started(self) -> bool:
        return self._session is not None

    def stop(self) -> None:
        if self._session is not None:
            self._session.stop()


def installed_pyspark_first(path: Sequence[str]) -> list[str]:
    """``path`` without the zips spark-submit puts ahead of it when they hold the installed modules:
    Spark run from the pip package (the default) brings ``pyspark.zip`` of that very package, and
    py4j's zip of the installed py4j's version. Python compiles every module it imports from a zip at
    each start (0.6-0.7 s of each Spark job's driver start); installed, they load byte-compiled. A
    Spark distribution's zips, or a py4j of another version, stay first."""
    plain = [entry for entry in path if not entry.endswith(".zip")]
    pyspark = PathFinder.find_spec("pyspark", plain)
    if pyspark is None or not pyspark.submodule_search_locations:
        return list(path)
    bundled = Path(pyspark.submodule_search_locations[0]) / "python" / "lib"
    copies = {bundled / "pyspark.zip"}
    if PathFinder.find_spec("py4j", plain) is not None:
        copies.add(bundled / f"py4j-{version('py4j')}-src.zip")
    return [entry for entry in path if Path(entry) not in copies]


def label_actions(spark: SparkSession, label: str) -> None:
    """Name the Spark actions from here on, until the next label: Spark's UI, its event logs and the
    pipeline benchmark's per-action profile show this instead of a JVM call site."""
    spark.sparkContext.setJobDescription(label)


def driver_java_options(configured: str, archive: Path) -> str:
    """The Spark driver's JVM options: ``configured`` (``spark.driver.extraJavaOptions``), Spark's log
    settings unless those name their own, and ``archive`` of the driver's classes once it is made.

    A JVM that cannot use the archive (another JDK, another class path) starts without it, silently.
    """
    options = [configured] if configured else []
    if "log4j2.configurationFile" not in configured:
        options.append(f"-Dlog4j2.configurationFile={LOG_SETTINGS.as_uri()}")
    if archive.is_file():
        options.append(f"-XX:SharedArchiveFile={archive}")
    return " ".join(options)


def java_binary() -> Path | None:
    """The java Spark's launcher runs: ``$JAVA_HOME/bin/java``, else the first on the PATH."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).is_file() else None


def class_archive() -> Path:
    """Where this installation keeps the archive of the Spark driver's classes (the JDK's
    application class-data sharing): a JVM started from it maps the thousands of classes Spark loads
    instead of reading and verifying them from jars. Each Spark job then started 3.3-3.6 s sooner
    (docs/benchmarks.md).

    The archive belongs to the installation (it lives in the environment's ``share/``), named after
    the Spark and the JVM it was made with: another JDK or Spark makes its own.
    """
    java = java_binary()
    jvm = [java, *java.parent.parent.glob("lib/server/libjvm.*")] if java else []
    identity = [
        version("pyspark"),
        *(f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in jvm),
    ]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return Path(sys.prefix) / "share" / "recsys-pipeline" / f"spark-driver-{key}.jsa"


# What puts folders on the driver's class path besides the jars (Spark's launcher reads them).
CLASS_PATH_SETTINGS = ("SPARK_CONF_DIR", "HADOOP_CONF_DIR", "YARN_CONF_DIR", "SPARK_DIST_CLASSPATH")


def archive_driver_classes(configured: str, archive: Path, timeout_s: float = 600.0) -> str:
    """Make ``archive`` unless it exists: run a small Spark job (``jobs/archive_classes.py``) whose
    JVM writes the classes it loaded as it exits. Return what happened, in a line.

    The JDK cannot archive for a class path holding a folder with files (a ``SPARK_CONF_DIR`` or
    ``HADOOP_CONF_DIR`` of a cluster's, say): its JVM does the job's work, then fails as it exits and
    writes nothing. That is why the archive is made by a job of its own, never by a pipeline's: jobs
    then run without one, as before. A failure is remembered beside the archive with the settings
    that shape the class path (``CLASS_PATH_SETTINGS``): until those change, asking again costs
    nothing (``make init`` asks every time).
    """
    if archive.is_file():
        return f"{archive} exists"
    failed = failure_record(archive)
    settings = {name: os.environ.get(name) for name in CLASS_PATH_SETTINGS}
    remembered = json.loads(failed.read_text()) if failed.is_file() else None
    if remembered is not None and remembered["settings"] == settings:
        return f"{remembered['outcome']} (remembered in {failed})"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as work:
        written = Path(work) / archive.name
        options = f"{driver_java_options(configured, archive)} -XX:ArchiveClassesAtExit={written}"
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
        try:
            done = subprocess.run(
                exercise_command(options, Path(work)),
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return f"no archive: its job took over {timeout_s:.0f} s; Spark jobs start without one"
        if done.returncode != 0 or not written.is_file():
            # The JVM says why it wrote no archive on its standard output, as it exits.
            said = done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or ["no output"]
            outcome = f"no archive ({said[-1]}); Spark jobs start without one"
            write_json(failed, {"settings": settings, "outcome": outcome})
            return outcome
        os.replace(written, archive)
    failed.unlink(missing_ok=True)
    return f"{archive} made ({archive.stat().st_size / 2**20:.0f} MB)"


def failure_record(archive: Path) -> Path:
    """Where :func:`archive_driver_classes` remembers why it made no ``archive``."""
    return archive.with_suffix(".failed.json")


def exercise_command(driver_options: str, work: Path, conf: Mapping[str, str] | None = None) -> list[str]:
    """The ``spark-submit`` of ``jobs/archive_classes.py`` (:func:`exercise` in ``work``) on a local
    master, its driver started with ``driver_options``, with any further Spark ``conf``."""
    settings = {DRIVER_OPTIONS: driver_options, **(conf or {})}
    return [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        *(argument for key, value in settings.items() for argument in ("--conf", f"{key}={value}")),
        str(PROJECT_ROOT / "jobs" / "archive_classes.py"),
        str(work),
    ]


def exercise(spark: SparkSession, work: Path) -> None:
    """Spark work of the kinds the pipeline's jobs do, on a few rows, so that the classes they load
    are the ones archived: file reads and writes (CSV, JSON, Parquet by partition), the expressions
    ingest maps records with, a window, aggregates, joins by broadcast and by shuffle."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = [
        (f"u{i % 7}", f"i{i % 5}", "View" if i % 2 else "click", str(i / 3), str(1_700_000_000 + i))
        for i in range(200)
    ]
    frame = spark.createDataFrame(rows, "user STRING, item STRING, type STRING, value STRING, ts STRING")
    frame.write.mode("overwrite").csv(str(work / "csv"), header=True)
    frame.write.mode("overwrite").json(str(work / "json"))
    read = spark.read.csv(str(work / "csv"), header=True).unionByName(spark.read.json(str(work / "json")))
    mapped = read.select(
        F.trim("user").alias("user_id"),
        F.lower(F.trim("item")).alias("item_id"),
        F.col("value").try_cast("double").alias("value"),
        F.timestamp_micros((F.col("ts").try_cast("double") * 1e6).try_cast("long")).alias("event_ts"),
        F.to_json(F.struct("user", "item", "type")).alias("raw_record"),
        F.input_file_name().alias("file"),
    ).withColumn("bad", F.col("user_id").rlike("[\\x00-\\x1f]") | F.isnan("value"))
    dated = mapped.withColumn("event_date", F.to_date("event_ts")).repartition("event_date")
    copies = Window.partitionBy("event_date", F.xxhash64("user_id", "item_id"), "user_id").orderBy("file")
    marked = dated.withColumn("copy", F.row_number().over(copies))
    marked.write.mode("overwrite").partitionBy("event_date").parquet(str(work / "staged"))
    staged = spark.read.parquet(str(work / "staged"))
    users = (
        staged.select(F.col("user_id").alias("id"))
        .distinct()
        .withColumn("user_idx", F.row_number().over(Window.orderBy("id")) - 1)
    )
    pairs = (
        staged.join(F.broadcast(users), staged["user_id"] == users["id"])
        .groupBy("user_idx", "item_id")
        .agg(F.sum("value").alias("confidence"), F.max("event_ts").alias("event_ts"))
    )
    supported = pairs.groupBy("item_id").count().where("count > 1")
    pairs.join(supported.hint("merge"), "item_id", "left_semi").write.mode("overwrite").parquet(
        str(work / "pairs")
    )
    spark.read.parquet(str(work / "pairs")).agg(F.sum("confidence")).collect()
