"""The state home: the folders every run shares (the lake, the ID maps, the registry's store) and the
locks that guard them."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateLayout:
    """The folders under the state home shared by all runs."""

    home: Path

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

    @contextmanager
    def lock(self, shared: bool = False, name: Literal["state", "aliases"] = "state") -> Iterator[None]:
        """Hold a state lock: ``state`` exclusive to write what all runs share (lake partitions, ID
        maps), shared to read it; ``aliases`` (held for milliseconds, only around alias moves) so a
        promotion or a rollback never waits behind a Spark job. Another process holding it makes
        this one wait, not fail.

        ``flock`` covers every process on this machine (Airflow tasks, ``spark-submit`` drivers,
        ``dags test``, the CLI); a state folder shared between machines needs a filesystem whose
        locks reach all of them.
        """
        path = self.home / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another run to release the state lock %s", path)
                fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
