"""A pipeline run: its identity (DAG, run id, data interval, mode), the configuration every task of it
uses, the version it is judged against, and whether it has been published.

Run folder (``<state>/runs/<dag_id>/<interval>/<run id>/``): one per run, so two runs of one window
(another config, a retry after a rejection) never share files. ``<interval>/published.json`` names
the run of that window last registered; a published run's folder is frozen
(:meth:`RunPublication.refuse_if_published`). The run's own records live here; what its stages write
is :class:`~recsys_pipeline.artifacts.RunArtifacts`::

    run.json                the run id and the resolved config every task of the run uses
    reference.json          the version the run is judged against or folds into, as first looked up
    published.json          the version this run was registered as (only once it was)
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from recsys_pipeline.artifacts import Gate, RunArtifacts
from recsys_pipeline.config import PipelineConfig, load_config
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import create_json, write_json
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.state import StateLayout

RUN_RECORD = "run.json"
PUBLISHED_RECORD = "published.json"
REFERENCE_RECORD = "reference.json"


def parse_instant(value: str | datetime) -> datetime:
    """A plain, aware UTC datetime from an ISO string or any datetime (naive means UTC).

    Airflow hands over pendulum datetimes, whose time zone Arrow does not recognise in filters.
    """
    instant = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return datetime.fromtimestamp(instant.timestamp(), tz=UTC)


RunMode = Literal["full", "refresh"]


# What a version must have passed to be promoted, by the run's mode. A fold-in has no untouched
# holdout to evaluate on; its gate is staying close to its parent.
REQUIRED_GATES: dict[RunMode, tuple[Gate, ...]] = {
    "full": (Gate.EVALUATION, Gate.INDEX, Gate.VALIDATION),
    "refresh": (Gate.REFRESH, Gate.INDEX, Gate.VALIDATION),
}


@dataclass(frozen=True)
class RunContext:
    """One pipeline run: its configuration, identity and data interval [start, end).

    ``mode`` is ``full`` for a retrain (the weekly DAG: re-ingest history, hold out the last
    days for evaluation) and ``refresh`` for a fold-in (the nightly DAG: ingest only the
    interval, fold the whole history into the champion's model).
    """

    config: PipelineConfig
    dag_id: str
    run_id: str
    interval_start: datetime
    interval_end: datetime
    mode: RunMode = "full"

    @classmethod
    def create(
        cls,
        config: PipelineConfig,
        dag_id: str,
        interval_start: str | datetime,
        interval_end: str | datetime,
        run_id: str | None = None,
        mode: RunMode = "full",
    ) -> RunContext:
        start, end = parse_instant(interval_start), parse_instant(interval_end)
        if end <= start:
            raise RecsysError(
                f"data interval end {end.isoformat()} is not after its start {start.isoformat()}"
            )
        return cls(config, dag_id, run_id or f"manual__{end.isoformat()}", start, end, mode)

    @classmethod
    def open(
        cls,
        dag_id: str,
        run_id: str,
        interval_start: str | datetime,
        interval_end: str | datetime,
        mode: RunMode = "full",
        config_path: Path | str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> RunContext:
        """The run as a task sees it: the config snapshot its first task took, or a new snapshot.

        Every task of one run uses the same configuration even if the YAML changes mid-run;
        a new run (another run id) of the same interval snapshots afresh.
        """
        config = load_config(config_path, overrides)
        return cls.create(config, dag_id, interval_start, interval_end, run_id, mode).snapshot_config()

    def snapshot_config(self) -> RunContext:
        """This run with the configuration recorded by its first task (recording it if this is the first).

        The record holds no secret: each is taken from the configuration this task loaded."""
        path = self.run_dir / RUN_RECORD
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("run_id") == self.run_id:
                return replace(self, config=self.config.from_record(record["config"]))
        pinned = self.config.model_copy(update={"state_dir": self.config.state_home})
        write_json(path, {"run_id": self.run_id, "config": pinned.as_record()})
        return replace(self, config=pinned)

    def pinned_reference(self, look_up: Callable[[], str | None]) -> str | None:
        """The registered version this run is judged against (a weekly) or folds into (a nightly), as
        the first of its stages to ask looked it up with ``look_up``; every later stage of the run gets
        the same answer even after the champion has moved, so the sweep's start, evaluation, drift, the
        row-count band and the fold-in all speak of one version. Kept per run id, like the config
        snapshot; of two stages asking at once, the first to record wins and both use its answer."""
        path = self.run_dir / REFERENCE_RECORD
        recorded = json.loads(path.read_text()) if path.is_file() else None
        if recorded is None or recorded.get("run_id") != self.run_id:
            record = {"run_id": self.run_id, "version": look_up()}
            if recorded is None:
                create_json(path, record)
            else:  # a folder copied from another run: its answer is not this run's
                write_json(path, record)
        version: str | None = json.loads(path.read_text())["version"]
        return version

    @property
    def layout(self) -> StateLayout:
        return StateLayout.of(self.config)

    @property
    def items_quarantine_dir(self) -> Path:
        """Item metadata rows this run quarantined, one folder per run id like the events'."""
        return self.layout.home / "lake" / "items_quarantine" / self.interval_key / self.run_slug

    @property
    def quarantine_dir(self) -> Path:
        """This run's quarantine table: one per run id, so a failed re-run keeps the earlier run's."""
        return self.layout.quarantine / self.interval_key / self.run_slug

    @property
    def run_slug(self) -> str:
        """The run id as one folder name, inside its parent and distinct for every distinct run id."""
        return run_slug(self.run_id)

    @property
    def interval_key(self) -> str:
        return f"{self.interval_start:%Y-%m-%dT%H%M}_{self.interval_end:%Y-%m-%dT%H%M}"

    @property
    def run_key(self) -> str:
        """Identifies the run across re-runs of the same DAG and interval (MLflow tags use it)."""
        return f"{self.dag_id}/{self.interval_key}"

    @property
    def window_dir(self) -> Path:
        """Every run of this DAG over this window, and the pointer to the one published."""
        return self.layout.home / "runs" / self.dag_id / self.interval_key

    @property
    def run_dir(self) -> Path:
        return self.window_dir / self.run_slug

    @property
    def artifacts(self) -> RunArtifacts:
        """What the run's stages write into its folder."""
        return RunArtifacts(self.run_dir, self.config.als)

    @property
    def publication(self) -> RunPublication:
        """Whether the run was published (which freezes its folder), and why it failed if it did."""
        return RunPublication(self.run_id, self.run_key, self.run_dir, self.window_dir, self.layout)


@dataclass(frozen=True)
class RunPublication:
    """The publishing state of one run: the version it became, and the failure a user must act on."""

    run_id: str
    run_key: str
    run_dir: Path
    window_dir: Path
    layout: StateLayout

    def mark_published(self, model: str, version: str) -> None:
        """Record that this run became ``model`` version ``version``: in its folder, which freezes it,
        and as the window's pointer."""
        record = {"model": model, "version": version, "run_id": self.run_id, "run_dir": self.run_dir.name}
        # The window's pointer first: a crash before the run's own record leaves the run unmarked,
        # and publishing it again finds its version and writes both.
        write_json(self.window_dir / PUBLISHED_RECORD, record)
        write_json(self.run_dir / PUBLISHED_RECORD, record)

    def published_version(self) -> str | None:
        path = self.run_dir / PUBLISHED_RECORD
        return str(json.loads(path.read_text())["version"]) if path.is_file() else None

    def refuse_if_published(self, task: str) -> None:
        """A published run's files are what its version was built from: a stage re-run (a cleared
        task) must not change them."""
        version = self.published_version()
        if version is not None:
            raise RecsysError(
                f"{task}: run {self.run_id} was published as version {version}, so its files stay as "
                "they were published; trigger a new run for this window instead of re-running this one"
            )

    def record_failure(self, task: str, error: Exception) -> None:
        """Keep why this run failed where ``recsys status`` looks when nothing became champion."""
        write_json(
            self.layout.last_failure,
            {
                "run_key": self.run_key,
                "task": task,
                "message": redact_text(str(error)),
                "failed_at": datetime.now(UTC).isoformat(),
            },
        )


MAX_SLUG = 200  # bytes of a folder name: file systems allow 255


def run_slug(run_id: str) -> str:
    """One folder name per run id: every byte outside ``A-Za-z0-9._+-`` as ``~XX`` (``~`` too, so no
    two ids share one; not ``%``, which MLflow and Hadoop decode in paths), a name of dots alone
    escaped as well (``.`` and ``..`` would name the folder itself or its parent), and an id too
    long for a file name cut and suffixed with its hash (longer than any uncut name, so the two kinds
    never meet)."""
    slug = "".join(chr(byte) if chr(byte) in SLUG_SAFE else f"~{byte:02X}" for byte in run_id.encode())
    if not slug.strip("."):
        slug = slug.replace(".", "~2E")
    if len(slug) > MAX_SLUG:
        slug = f"{slug[: MAX_SLUG - 10]}~{hashlib.sha256(run_id.encode()).hexdigest()[:16]}"
    return slug


SLUG_SAFE = frozenset(string.ascii_letters + string.digits + "._+-")


def now_utc() -> datetime:
    return datetime.now(UTC)
