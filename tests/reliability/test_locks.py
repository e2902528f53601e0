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
