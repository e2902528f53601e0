"""The locks that guard what runs share hold across processes, and across machines with the
``postgres`` backend; a lock not free in time fails naming its holder (issue #34, item 3)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_pipeline.config import ConfigError, LocksConfig, load_config
from recsys_pipeline.state import LockTimeoutError, StateLayout

HOLDER = """
import sys, time
from pathlib import Path
from recsys_pipeline.config import LocksConfig
from recsys_pipeline.state import StateLayout

layout = StateLayout(Path(sys.argv[1]), LocksConfig.model_validate_json(sys.argv[2]))
with layout.lock():
    print("held", flush=True)
    time.sleep(600)
"""


# The postgres backend runs against a real cluster: a deployment's server (make test-deploy).
POSTGRES = pytest.param("postgres", marks=[pytest.mark.e2e, pytest.mark.slow, pytest.mark.deploy])


@pytest.fixture(params=["flock", POSTGRES])
def locks(request) -> LocksConfig:
    if request.param == "postgres":
        return LocksConfig(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"), timeout_s=1)
    return LocksConfig(timeout_s=1)


@pytest.mark.e2e
def test_a_lock_held_by_another_process_times_out_naming_it_then_frees_when_it_dies(locks, tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), locks.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        layout = StateLayout(tmp_path, locks)
        for shared in (False, True):  # an exclusive holder keeps readers out too
            started = time.monotonic()
            with pytest.raises(
                LockTimeoutError, match=rf"state lock .* not free within .* held by .*pid {holder.pid}"
            ):
                with layout.lock(shared=shared):
                    pass
            assert 1 <= time.monotonic() - started < 10
        with layout.lock(name="aliases"):  # another lock is another lock
            pass
    finally:
        holder.kill()
        holder.wait()
    with StateLayout(tmp_path, locks).lock():  # a killed holder's lock is gone with it
        pass


def test_shared_locks_are_held_together_and_keep_a_writer_out(locks, tmp_path: Path) -> None:
    first, second, writer = (StateLayout(tmp_path, locks) for _ in range(3))
    with first.lock(shared=True), second.lock(shared=True):
        with pytest.raises(LockTimeoutError):
            with writer.lock():
                pass
    with writer.lock():
        pass


def test_two_state_folders_on_one_database_never_share_a_lock(tmp_path: Path) -> None:
    locks = LocksConfig(backend="postgres", dsn="postgresql://postgres@db/postgres")
    assert StateLayout(tmp_path / "a", locks).lock_key("state") != StateLayout(
        tmp_path / "b", locks
    ).lock_key("state")
    assert StateLayout(tmp_path / "a", locks).lock_key("state") != StateLayout(
        tmp_path / "a", locks
    ).lock_key("aliases")


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://airflow:s3cret@db:5432/airflow", "host=db user=airflow password=s3cret dbname=airflow"],
)
def test_a_lock_database_is_named_without_its_password(dsn: str) -> None:
    with pytest.raises(ConfigError, match="locks.dsn holds a password: set PGPASSWORD"):
        load_config(overrides={"locks": {"backend": "postgres", "dsn": dsn}})
    with pytest.raises(ConfigError, match="locks.backend postgres needs locks.dsn"):
        load_config(overrides={"locks": {"backend": "postgres"}})


@pytest.mark.e2e
@pytest.mark.slow  # a Spark stage and a publish, under a minute: kept out of make test's budget
@pytest.mark.parametrize("name", ["state", "aliases"])
def test_what_writes_shared_state_waits_for_its_lock(spark, own_weekly_run, name: str) -> None:
    """Each writer of what runs share goes through its lock: with the lock held elsewhere, extending
    the ID maps (``state``) and moving the champion (``aliases``) wait, then fail naming the holder.
    A writer that skipped the lock would go ahead here (what the concurrency test can only catch
    under an unlucky interleaving)."""
    from recsys_pipeline.registry import Registry
    from recsys_pipeline.stages.interactions import run_interactions
    from recsys_pipeline.stages.publish import run_publish

    locks = LocksConfig(timeout_s=1)
    config = own_weekly_run.config.model_copy(update={"locks": locks})
    run = own_weekly_run.__class__.create(
        config,
        own_weekly_run.dag_id,
        own_weekly_run.interval_start,
        own_weekly_run.interval_end,
        "manual__held",
    )
    version = run_publish(own_weekly_run) if name == "aliases" else None
    script = HOLDER.replace("layout.lock()", f"layout.lock(name={name!r})")
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(config.state_home), locks.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError, match=rf"{name} lock .* held by .*pid {holder.pid}"):
            if name == "state":
                run_interactions(spark, run)
            else:
                Registry(config).promote(str(version), "test: the alias lock is held")
    finally:
        holder.kill()
        holder.wait()


FIRST_STORE_USE = """
import sys, time
from pathlib import Path
from recsys_pipeline import tracking
from recsys_pipeline.config import RegistryConfig

config = RegistryConfig(state_dir=sys.argv[1])
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
bound = tracking.client(config)
print(tracking.experiment_id(bound, config), len(bound.search_registered_models()))
"""


@pytest.mark.e2e
def test_runs_starting_at_once_on_a_new_state_folder_share_one_embedded_store(tmp_path: Path) -> None:
    # MLflow migrates a new SQLite store on first use without a lock: without the one beside the
    # database, all but one of these fail in its migrations.
    go = tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_STORE_USE, str(tmp_path / "state"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        assert run.stdout is not None and run.stdout.readline().strip() == "ready"
    go.touch()
    outcomes = [run.communicate(timeout=120) for run in runs]
    assert [(run.returncode, out.strip()) for run, (out, _) in zip(runs, outcomes, strict=True)] == [
        (0, "1 0")
    ] * 3, [err[-2000:] for _, err in outcomes]
