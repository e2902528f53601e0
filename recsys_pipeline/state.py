"""The state home: the folders every run shares (the lake, the ID maps, the registry's store) and the
locks that guard them."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recsys_pipeline.config import LocksConfig, RegistryConfig
from recsys_pipeline.errors import RecsysError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateLayout:
    """The folders under the state home shared by all runs."""

    home: Path
    locks: LocksConfig = field(default_factory=LocksConfig)

    @property
    def events_lake(self) -> Path:
        return self.home / "lake" / "events"

    @property
    def quarantine(self) -> Path:
        return self.home / "lake" / "quarantine"

    @property
    def items_lake(self) -> Path:
        """The item metadata the content stage encodes (the latest weekly run's)."""
        return self.home / "lake" / "items"

    @property
    def id_maps(self) -> Path:
        return self.home / "id_maps"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def model_cache(self) -> Path:
        return self.home / "cache" / "models"

    @property
    def bench(self) -> Path:
        return self.home / "bench"

    @property
    def pair_history(self) -> Path:
        """Points at the latest run's pair aggregates, which the next refresh carries forward."""
        return self.home / "runs" / "pair_history.json"

    @property
    def last_failure(self) -> Path:
        """The latest run failure a user must act on (written by the task that failed)."""
        return self.home / "runs" / "last_failure.json"

    @classmethod
    def of(cls, config: RegistryConfig) -> StateLayout:
        return cls(config.state_home, config.locks)

    @contextmanager
    def lock(self, shared: bool = False, name: LockName = "state") -> Iterator[None]:
        """Hold a state lock: ``state`` exclusive to write what all runs share (lake partitions, ID
        maps), shared to read it; ``aliases`` (held for milliseconds, only around alias moves) so a
        promotion or a rollback never waits behind a Spark job. Another holder makes this one wait,
        up to ``locks.timeout_s``; then :class:`LockTimeoutError` names who holds it.

        With ``locks.backend: flock``, lock files in the state folder cover every process on this
        machine (Airflow tasks, ``spark-submit`` drivers, ``dags test``, the CLI), or several machines
        only where the file system's locks reach them all; with ``postgres``, advisory locks on one
        database cover any number of machines, and a crashed holder's lock goes with its connection.
        """
        holder = describe_holder()
        if self.locks.backend == "postgres":
            with postgres_lock(self.locks, self.lock_key(name), name, shared, holder):
                yield
        else:
            with file_lock(self.home / "locks" / f"{name}.lock", name, shared, self.locks.timeout_s, holder):
                yield

    def probe_lock(self, name: LockName = "state") -> str:
        """Whether the lock's backend answers and the lock could be shared now, without waiting:
        ``free``, or who holds it."""
        if self.locks.backend == "postgres":
            import psycopg

            key = self.lock_key(name)
            with psycopg.connect(self.locks.dsn or "", autocommit=True) as connection:
                taken = connection.execute("SELECT pg_try_advisory_lock_shared(%s)", (key,)).fetchone()
                if taken and taken[0]:
                    connection.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))
                    return "free"
                return f"held by {advisory_holders(connection, key)}"
        path = self.home / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = path.with_suffix(".holder")
                return f"held by {holders.read_text().strip() if holders.is_file() else 'unknown'}"
            fcntl.flock(handle, fcntl.LOCK_UN)
            return "free"

    def lock_key(self, name: LockName) -> int:
        """The advisory lock's key: one per state home and lock, so two state folders on one database
        never share a lock."""
        digest = hashlib.sha256(f"recsys:{self.home}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


LockName = Literal["state", "aliases"]


class LockTimeoutError(RecsysError):
    """A lock another run holds was not released within ``locks.timeout_s``."""


def describe_holder() -> str:
    """Who takes a lock, as a person looking for the holder needs it: host, process and Airflow task."""
    task = "/".join(
        os.environ[name]
        for name in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID")
        if os.environ.get(name)
    )
    return f"{socket.gethostname()} pid {os.getpid()}" + (f" task {task}" if task else "")


@contextmanager
def file_lock(path: Path, name: str, shared: bool, timeout_s: float, holder: str) -> Iterator[None]:
    """``flock`` on ``path``; the holder's description is kept beside it for a waiter's message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holders = path.with_suffix(".holder")
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = time.monotonic() + timeout_s
    with path.open("a+") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held_by = holders.read_text().strip() if holders.is_file() else "unknown"
                    raise LockTimeoutError(
                        f"the {name} lock ({path}) was not free within locks.timeout_s={timeout_s:g} s: "
                        f"held by {held_by}"
                    ) from None
                if not waited:
                    log.info("waiting for another run to release the %s lock %s", name, path)
                    waited = True
                time.sleep(min(FILE_LOCK_POLL_S, max(deadline - time.monotonic(), 0.0)))
        try:
            if not shared:
                holders.write_text(f"{holder}\n")
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


FILE_LOCK_POLL_S = 0.5


@contextmanager
def postgres_lock(locks: LocksConfig, key: int, name: str, shared: bool, holder: str) -> Iterator[None]:
    """A session-level advisory lock on ``locks.dsn``: released when the block ends, or when the
    connection does (a killed holder frees it)."""
    import psycopg

    kind = "_shared" if shared else ""
    # application_name is what a waiter reads back from pg_stat_activity: who holds the lock.
    with psycopg.connect(
        locks.dsn or "", autocommit=True, application_name=f"recsys {holder}"[:63]
    ) as connection:
        acquired = connection.execute(f"SELECT pg_try_advisory_lock{kind}(%s)", (key,)).fetchone()
        if not (acquired and acquired[0]):
            log.info("waiting for another run to release the %s lock (postgres advisory lock %d)", name, key)
            connection.execute(
                "SELECT set_config('lock_timeout', %s, false)", (f"{int(locks.timeout_s * 1000)}ms",)
            )
            try:
                connection.execute(f"SELECT pg_advisory_lock{kind}(%s)", (key,))
            except psycopg.errors.LockNotAvailable:
                raise LockTimeoutError(
                    f"the {name} lock (postgres advisory lock {key}) was not free within "
                    f"locks.timeout_s={locks.timeout_s:g} s: held by {advisory_holders(connection, key)}"
                ) from None
        try:
            yield
        finally:
            connection.execute(f"SELECT pg_advisory_unlock{kind}(%s)", (key,))


def advisory_holders(connection: Any, key: int) -> str:
    """Who holds the advisory lock ``key``, as their connections named themselves."""
    rows = connection.execute(
        """
        SELECT activity.application_name, activity.client_addr, activity.pid, locks.mode
        FROM pg_locks AS locks JOIN pg_stat_activity AS activity USING (pid)
        WHERE locks.locktype = 'advisory' AND locks.granted
          AND locks.classid = %s AND locks.objid = %s AND locks.objsubid = 1
        """,
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ).fetchall()
    return (
        "; ".join(
            f"{name} ({address or 'local'}, backend pid {pid}, {mode})" for name, address, pid, mode in rows
        )
        or "unknown"
    )
