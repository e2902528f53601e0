"""The client a recommendation service embeds: the version behind an alias, verified and in memory,
swapped for a newer one while requests keep being answered.

    client = RecsysClient(RegistryConfig(         # champion, from a tracking server
        mlflow={"tracking_uri": "http://mlflow:5000"}, state_dir="/var/cache/recsys"))
    client.recommend("196", k=10)
    client.for_session(["242", "302"], k=10)      # from what a visitor just did
    watcher = client.watch(interval_s=60)         # follow the alias; watcher.wake() checks at once

Without a configuration the client reads the project's (``conf/``, ``RECSYS_CONFIG``), as the CLI
does. Every request reads the loaded version once and answers from it alone, so no answer mixes two
versions. A new version is downloaded, checked file by file against the manifest whose sha256 the
registry holds, and loaded in full beside the one serving; only then does it replace it (one
reference assignment). A version that fails verification or loading is never served: the one
serving stays, and the failure is logged and kept in :attr:`RecsysClient.last_error`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import pandas as pd

from recsys_pipeline.bundle import Bundle
from recsys_pipeline.config import RegistryConfig, load_config
from recsys_pipeline.registry import CHAMPION, NothingPublishedError, Registry
from recsys_pipeline.serving import DEFAULT_K, DEFAULT_SESSION_WEIGHT, Recommender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """A registered version in memory, whole."""

    version: str
    recommender: Recommender


class RecsysClient:
    """The version behind ``alias``, verified and loaded; see the module's documentation."""

    def __init__(
        self,
        config: RegistryConfig | None = None,
        alias: str = CHAMPION,
        session_weight: float = DEFAULT_SESSION_WEIGHT,
    ):
        self.registry = Registry(config or load_config())
        self.alias = alias
        self.session_weight = session_weight
        self.last_error: Exception | None = None
        self._refreshing = threading.Lock()
        self._loaded: LoadedVersion | None = None
        if not self.refresh():
            raise self.last_error or NothingPublishedError(f"nothing behind the alias '{alias}'")

    @property
    def version(self) -> str:
        """The version answering requests now."""
        return self.loaded().version

    def refresh(self) -> bool:
        """Serve the version behind the alias if it is not the one serving: download, verify and load
        it beside the current one, then swap. True when the version behind the alias is serving."""
        with self._refreshing:
            try:
                registered = self.registry.alias_version(self.alias)
                if registered is None:
                    raise NothingPublishedError(
                        f"no version of {self.registry.config.mlflow.model_name} has the alias '{self.alias}'"
                    )
                number = str(registered.version)
                if self._loaded is not None and self._loaded.version == number:
                    return True
                model = self.registry.verified_model(number)
                loaded = LoadedVersion(number, Recommender(Bundle(model / "artifacts" / "bundle")))
            # Whatever failed (verification, the download, a file that does not load), the version
            # serving stays: a watcher thread must outlive a bad version and retry at its next check.
            except Exception as error:
                self.last_error = error
                log.error("keeping version %s: %s", self._loaded.version if self._loaded else None, error)
                return False
            previous, self._loaded = self._loaded, loaded
            self.last_error = None
            log.info("serving version %s (was %s)", number, previous.version if previous else None)
            return True

    def watch(self, interval_s: float = 60.0) -> Watcher:
        """Check the alias every ``interval_s`` seconds in a background thread until the watcher is
        stopped; ``wake()`` checks at once (for a consumer of the champion's Airflow Asset)."""
        watcher = Watcher(self, interval_s)
        watcher.start()
        return watcher

    def recommend(self, user_id: str, k: int = DEFAULT_K, unknown: str = "popular") -> pd.DataFrame:
        return self.loaded().recommender.recommend(user_id, k, unknown=unknown)

    def similar(self, item_id: str, k: int = DEFAULT_K) -> pd.DataFrame:
        return self.loaded().recommender.similar(item_id, k)

    def precomputed(self, user_id: str) -> pd.DataFrame:
        return self.loaded().recommender.precomputed(user_id)

    def for_session(
        self,
        recent_item_ids: list[str],
        k: int = DEFAULT_K,
        weights: list[float] | None = None,
        user_id: str | None = None,
    ) -> pd.DataFrame:
        return self.loaded().recommender.for_session(
            recent_item_ids, k, weights, user_id, self.session_weight
        )

    def loaded(self) -> LoadedVersion:
        loaded = self._loaded
        if loaded is None:  # only before the first load succeeded, which the constructor ensures
            raise NothingPublishedError(f"nothing loaded for the alias '{self.alias}'")
        return loaded


class Watcher(threading.Thread):
    """Refreshes a client every ``interval_s`` seconds, or at once when woken."""

    def __init__(self, client: RecsysClient, interval_s: float):
        super().__init__(name=f"recsys-watch-{client.alias}", daemon=True)
        self.client = client
        self.interval_s = interval_s
        self._woken = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self._woken.wait(self.interval_s)
            self._woken.clear()
            if not self._stopped.is_set():
                self.client.refresh()

    def wake(self) -> None:
        self._woken.set()

    def stop(self, timeout_s: float | None = None) -> None:
        self._stopped.set()
        self._woken.set()
        self.join(timeout_s)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
