"""How a Spark driver starts: the options it starts with, how its class archive is made, and where it
imports pyspark from."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pyspark
import pytest

from recsys_pipeline.spark import (
    LOG_SETTINGS,
    archive_driver_classes,
    driver_java_options,
    exercise_command,
    failure_record,
    installed_pyspark_first,
)


@pytest.mark.unit
def test_a_driver_starts_from_the_archive_only_once_it_exists(tmp_path: Path) -> None:
    archive = tmp_path / "driver.jsa"
    before = driver_java_options("-XX:+UseParallelGC", archive)
    assert before == f"-XX:+UseParallelGC -Dlog4j2.configurationFile={LOG_SETTINGS.as_uri()}"
    archive.write_bytes(b"made")
    assert driver_java_options("-XX:+UseParallelGC", archive) == f"{before} -XX:SharedArchiveFile={archive}"


@pytest.mark.unit
def test_log_settings_of_ones_own_are_kept(tmp_path: Path) -> None:
    own = "-Dlog4j2.configurationFile=file:///etc/spark/log4j2.properties"
    assert driver_java_options(own, tmp_path / "none.jsa") == own
    default = f"-Dlog4j2.configurationFile={LOG_SETTINGS.as_uri()}"
    assert driver_java_options("", tmp_path / "none.jsa") == default


@pytest.mark.unit
def test_the_zips_spark_submit_puts_first_give_way_to_the_installed_copies() -> None:
    bundled = Path(pyspark.__file__).parent / "python" / "lib"
    pyspark_zip, py4j_zip = str(bundled / "pyspark.zip"), str(bundled / f"py4j-{version('py4j')}-src.zip")
    # As spark-submit hands the driver its path: the package's zips, then the rest.
    submitted = [pyspark_zip, py4j_zip, *sys.path]
    assert installed_pyspark_first(submitted) == sys.path
    # A Spark distribution's zips, and a py4j zip of another version, are what that Spark needs.
    distribution = ["/opt/spark/python/lib/pyspark.zip", "/opt/spark/python/lib/py4j-0.10.9.1-src.zip"]
    other_py4j = str(bundled / "py4j-0.10.9.1-src.zip")
    kept = [*distribution, other_py4j, *sys.path]
    assert installed_pyspark_first(kept) == kept
    # And the driver then imports the installed, byte-compiled pyspark.
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from recsys_pipeline.spark import installed_pyspark_first; "
            "sys.path[:] = installed_pyspark_first(sys.path); import pyspark; print(pyspark.__file__)",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([pyspark_zip, py4j_zip])},
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == pyspark.__file__


@pytest.mark.slow
def test_a_class_path_the_jdk_cannot_archive_leaves_jobs_without_an_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spark puts SPARK_CONF_DIR on the driver's class path; the JDK archives none holding files.
    conf_dir = tmp_path / "spark-conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text("spark.ui.enabled false\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))
    archive = tmp_path / "share" / "driver.jsa"
    outcome = archive_driver_classes("", archive, timeout_s=120)
    assert outcome.startswith("no archive (") and outcome.endswith("Spark jobs start without one")
    assert "directory" in outcome
    failure = failure_record(archive)
    assert not archive.exists() and list(archive.parent.iterdir()) == [failure]
    # Asked again with the same class path (as every `make init` asks), it runs no job.
    assert archive_driver_classes("", archive, timeout_s=1) == f"{outcome} (remembered in {failure})"
    # Another class path is tried anew.
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "empty"))
    assert archive_driver_classes("", archive, timeout_s=1).startswith("no archive: its job took over 1 s")


@pytest.mark.slow
def test_a_made_archive_serves_sparks_classes_to_a_job_that_does_its_work(tmp_path: Path) -> None:
    archive = tmp_path / "driver.jsa"
    assert archive_driver_classes("-XX:+UseParallelGC", archive).endswith(" MB)")
    assert archive_driver_classes("-XX:+UseParallelGC", archive) == f"{archive} exists"
    options = driver_java_options("-XX:+UseParallelGC", archive)
    assert options.endswith(f"-XX:SharedArchiveFile={archive}")
    # The JVM logs where each class came from: Spark's own classes come from the archive, hardly any
    # from its jars (a few the JDK does not archive; classes made at run time, lambdas and generated
    # code, are defined anew), and the job does its work.
    logged = f"{options} -Xlog:class+load=info:file={tmp_path / 'classes.log'}"
    # spark-submit finds Spark through this interpreter's pyspark, as the archive's own job does.
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(
        exercise_command(logged, tmp_path / "work"), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = (tmp_path / "classes.log").read_text().splitlines()
    spark_classes = [line for line in loaded if " org.apache.spark." in line]
    shared = [line for line in spark_classes if "source: shared objects file" in line]
    from_jars = [line for line in spark_classes if line.endswith(".jar") and "GeneratedClass" not in line]
    assert len(shared) > 1000 and len(from_jars) < 0.01 * len(shared)
    assert (tmp_path / "work" / "pairs").is_dir()
