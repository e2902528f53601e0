"""Shared fixtures and helpers: a small local Spark session, configurations over temporary state
folders, the weekly stages run once per session, and copies of its state for tests that change it.

Test tiers (markers): ``unit`` (no Spark, seconds), ``spark`` (a local Spark session or a whole
pipeline in process), ``e2e`` (whole DAG runs and external servers). A test without a tier marker
is ``spark`` if it uses the Spark session (directly or through a fixture), else ``unit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# py4j logs each connection it closes at INFO, also from the collector at the interpreter's exit,
# after pytest has closed the streams the tests' log handlers write to: a "Logging error" traceback
# at the end of the suite's output.
logging.getLogger("py4j").setLevel(logging.WARNING)

from recsys_pipeline.config import PipelineConfig, load_config  # noqa: E402
from recsys_pipeline.runs import PUBLISHED_RECORD, RunContext  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# The project's Spark settings (the write paths, joins and parsing they choose), with two partitions
# a shuffle for the tests' few rows and no UI.
TEST_SPARK_CONF = {
    **load_config().spark.conf,
    "spark.sql.shuffle.partitions": "2",
    "spark.ui.enabled": "false",
}
# In-process runs train once at the configured values: the sweep (tens of trials) is covered by
# test_tuning, the default-config quality test and every DAG test, which run the project config.
TEST_OVERRIDES = {"spark.conf": TEST_SPARK_CONF, "als.sweep": None}
# A test's tier is what it starts: nothing (unit), a Spark session in this process (spark), other
# processes such as CLIs, killed workers, servers and DAG runs (e2e, marked by hand). An unmarked
# test is unit, or spark when its fixtures start Spark; a slow one is never inferred to be unit.
TIERS = ("unit", "spark", "e2e", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        tier = "spark" if "spark" in getattr(item, "fixturenames", ()) else "unit"
        item.add_marker(getattr(pytest.mark, tier))
    # Under `pytest -n 2 --dist loadfile` the modules with the most whole-DAG runs start first: their
    # tests share one state and run in sequence, so starting them late would set the suite's length.
    e2e_runs = Counter(item.path for item in items if item.get_closest_marker("e2e"))
    items.sort(key=lambda item: -e2e_runs[item.path])


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from recsys_pipeline.spark import spark_session

    config = load_config(overrides=TEST_OVERRIDES)
    session = spark_session(config, "recsys-tests", master="local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def movielens() -> Any:
    """The bundled MovieLens-100k ratings as a binary (users x items) CSR matrix, ids minus one."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    ratings = pd.read_csv(
        load_config().source.path, sep="\t", names=["user", "item", "rating", "ts"], usecols=[0, 1]
    )
    return sp.csr_matrix(
        (np.ones(len(ratings), np.float32), (ratings.user - 1, ratings.item - 1)),
        shape=(ratings.user.max(), ratings.item.max()),
    )


ConfigFactory = Callable[..., PipelineConfig]


CSV_EVENTS_MAPPING = {
    "user_id": "user",
    "item_id": "item",
    "event_type": "type",
    "value": "value",
    "timestamp": "ts",
}


@dataclass(frozen=True)
class Staged:
    """What :func:`~recsys_pipeline.events.ingest` (or the driver's) staged, as Spark reads it: the
    accepted events, the quarantine as the stage writes it, and the result."""

    events: Any
    quarantine: Any
    metrics: dict[str, float]
    files: dict[str, Any]


def ingest_staged(
    spark: Any,
    config: PipelineConfig,
    window: tuple[datetime, datetime],
    ingested_at: datetime,
    staging: Path,
    **options: Any,
) -> Staged:
    """The whole of ``config``'s source through Spark's ingest over ``window``, staged in ``staging``."""
    from recsys_pipeline.events import ingest, read_source

    result = ingest(
        read_source(spark, config.source),
        config.source,
        config.events,
        *window,
        ingested_at,
        staging,
        **options,
    )
    return staged(spark, result, staging)


def staged(spark: Any, result: Any, staging: Path) -> Staged:
    from recsys_pipeline.events import EVENT_COLUMNS, STAGING_SCHEMA, write_quarantine

    write_quarantine(staging, staging.with_name(f"{staging.name}_quarantine"))
    rows = spark.read.schema(STAGING_SCHEMA).parquet(str(staging))
    return Staged(
        rows.where("reason IS NULL").select(*EVENT_COLUMNS),
        spark.read.parquet(str(staging.with_name(f"{staging.name}_quarantine"))),
        result.metrics,
        result.files,
    )


def csv_events_source(name: str, path: Path) -> dict[str, Any]:
    """Config overrides for a comma-separated event log (or folder of them) with the header
    ``user,item,type,value,ts``."""
    return {
        "source.name": name,
        "source.path": str(path),
        "source.delimiter": ",",
        "source.header": True,
        "source.column_names": None,
        "source.mapping": CSV_EVENTS_MAPPING,
        "source.default_event_type": None,
    }


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """The project config with its state under tmp_path and any dotted overrides applied."""

    def factory(**overrides: Any) -> PipelineConfig:
        base: dict[str, Any] = {"state_dir": str(tmp_path / "state"), **TEST_OVERRIDES}
        base.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_config(overrides=base)

    return factory


def run_weekly_stages(spark: Any, run: RunContext) -> None:
    """Every stage of the weekly pipeline up to validation, in process (nothing published)."""
    from recsys_pipeline.pipelines import WEEKLY, run_in_process

    run_in_process(WEEKLY, run, spark, until="validate")


@pytest.fixture(scope="session")
def weekly_run(spark, tmp_path_factory) -> RunContext:
    """Every stage of the weekly pipeline, in process, on the bundled sample (nothing published).

    Shared by the session: tests that publish, promote or otherwise write state use ``own_weekly_run``.
    """
    state = tmp_path_factory.mktemp("state")
    config = load_config(overrides={"state_dir": str(state), **TEST_OVERRIDES})
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__test")
    run_weekly_stages(spark, run)
    return run


@pytest.fixture
def own_weekly_run(weekly_run: RunContext, tmp_path: Path) -> RunContext:
    """The weekly run's outputs in a state folder of this test's own (its registry starts empty)."""
    state = tmp_path / "state"
    shutil.copytree(weekly_run.config.state_home, state, ignore=shutil.ignore_patterns("mlflow", "cache"))
    config = weekly_run.config.model_copy(update={"state_dir": state})
    return RunContext.create(
        config, weekly_run.dag_id, weekly_run.interval_start, weekly_run.interval_end, weekly_run.run_id
    )


def copy_run(run: RunContext, start: str, end: str) -> RunContext:
    """The run's outputs under another interval of the same state folder (a later run with equal results,
    judged against the champion of its time, as its evaluate stage would record)."""
    from recsys_pipeline.registry import CHAMPION, Registry

    other = RunContext.create(run.config, run.dag_id, start, end, f"manual__{end}")
    unpublished = shutil.ignore_patterns(PUBLISHED_RECORD)
    shutil.copytree(run.run_dir, other.run_dir, dirs_exist_ok=True, ignore=unpublished)
    champion = Registry(run.config).alias_version(CHAMPION)
    path = other.run_dir / "metrics" / "evaluate.json"
    evaluated = json.loads(path.read_text()) if path.is_file() else {}
    evaluated.pop("reference_version", None)
    if champion is not None:
        evaluated["reference_version"] = float(champion.version)
    other.artifacts.write_metrics("evaluate", evaluated)
    return other


def another_run_of(run: RunContext, run_id: str, config: PipelineConfig | None = None) -> RunContext:
    """A second run of the run's window (another run id, maybe another config) that got as far as it."""
    config = config or run.config
    other = RunContext(config, run.dag_id, run_id, run.interval_start, run.interval_end, run.mode)
    unpublished = shutil.ignore_patterns(PUBLISHED_RECORD, "run.json")
    shutil.copytree(run.run_dir, other.run_dir, dirs_exist_ok=True, ignore=unpublished)
    return other


def write_interactions(run: RunContext, matrix: Any) -> None:
    """Write a (users x items) matrix as the run's training interactions, with ID maps, no holdout."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    coo = matrix.tocoo()
    out = run.artifacts.interactions.root
    for name, rows, cols, values in (("train", coo.row, coo.col, coo.data), ("holdout", [], [], [])):
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "user_idx": pa.array(np.asarray(rows, dtype=np.int32)),
                    "item_idx": pa.array(np.asarray(cols, dtype=np.int32)),
                    "confidence": pa.array(np.asarray(values, dtype=np.float32)),
                }
            ),
            out / name / "part-0.parquet",
        )
    for side, size in (("users", matrix.shape[0]), ("items", matrix.shape[1])):
        run.artifacts.interactions.map_dir(side).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"id": [str(i) for i in range(size)], "idx": pa.array(np.arange(size, dtype=np.int32))}),
            run.artifacts.interactions.map_dir(side) / "part-0.parquet",
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    stop(process)
    raise AssertionError(f"{url} did not answer within {timeout_s}s: {log.read_text()[-3000:]}")


def start(
    command: list[str], env: dict[str, str], url: str, log: Path, timeout_s: float = 180
) -> subprocess.Popen:
    """Start a server in its own process group, logging to a file (an unread pipe would fill and block it)."""
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for(url, process, log, timeout_s)
    return process


def stop(process: subprocess.Popen) -> None:
    """Stop a server started by :func:`start` and everything in its process group."""
    os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    # A child can outlive its leader's clean exit: `airflow standalone`'s scheduler was found running
    # an hour after its test had ended.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def invocations(port: int, records: list[dict[str, Any]]) -> Any:
    """What a model server on ``port`` answers to ``records`` at ``/invocations``, as a DataFrame."""
    import pandas as pd

    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return pd.DataFrame(json.loads(response.read())["predictions"])


def run_recsys(*args: str) -> subprocess.CompletedProcess:
    """The ``recsys`` command of this environment, as a user runs it; output captured, never checked."""
    recsys = str(Path(sys.executable).parent / "recsys")
    return subprocess.run([recsys, *args], capture_output=True, text=True, timeout=120)


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries Debian's ``postgresql`` package installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise AssertionError("PostgreSQL's server is not installed: run `make servers` (Debian's postgresql)")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port, trusting local connections; its DSN.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user, in a
    folder of its own outside pytest's root-only temporary folders."""
    import tempfile

    binaries = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    data, port = root / "data", free_port()
    as_owner: list[str] = []
    if os.geteuid() == 0:
        root.chmod(0o755)
        shutil.chown(root, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_owner, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [
            *as_owner,
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(root / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def postgres_database(dsn: str, name: str) -> str:
    """A new database on the cluster at ``dsn``, as an SQLAlchemy URL through psycopg 3."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return dsn.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{name}"
