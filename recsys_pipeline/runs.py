"""Where each stage reads and writes: fixed locations derived from a run's data interval.

Every stage writes into a temporary sibling and renames it into place on success, so
a crashed stage never leaves a half-written output and re-running a stage is safe.
Each stage output has one typed reader and writer here, so no other module names its files.

Run folder (``<state>/runs/<dag_id>/<interval>/<run id>/``): one per run, so two runs of one window
(another config, a retry after a rejection) never share files. ``<interval>/published.json`` names
the run of that window last registered; a published run's folder is frozen
(:meth:`RunContext.refuse_if_published`)::

    published.json          the version this run was registered as (only once it was)
    run.json                the run id and the resolved config every task of the run uses
    reference.json          the version the run is judged against or folds into, as first looked up
    interactions/           train/, holdout/, maps/{users,items}/, recent/{users,items}/, fingerprint.txt
    model/                  user_factors.parquet, item_factors.parquet, training_loss.json, params.json,
                            sweep.json (after a sweep)
    refresh/refresh.json    a nightly refresh's lineage and escalation decision
    parent_drift/           a nightly refresh's drift against its weekly parent, which validation
                            takes when the champion is that parent
    index/ recommendations/ validation/ bundle/
    metrics/<stage>.json    gates/<gate>.json
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import string
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.config import AlsConfig, PipelineConfig, load_config, run_overrides
from recsys_pipeline.embeddings import Embeddings, read_embeddings, write_embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.tables import Triples, count_rows, read_id_map, read_indices, read_matrix

Side = Literal["users", "items"]
SIDES: tuple[Side, ...] = ("users", "items")
RUN_RECORD = "run.json"
PUBLISHED_RECORD = "published.json"
REFERENCE_RECORD = "reference.json"
log = logging.getLogger(__name__)
TRAINED_PARAMS, TRAINING_LOSS, SWEEP = "params.json", "training_loss.json", "sweep.json"


def parse_instant(value: str | datetime) -> datetime:
    """A plain, aware UTC datetime from an ISO string or any datetime (naive means UTC).

    Airflow hands over pendulum datetimes, whose time zone Arrow does not recognise in filters.
    """
    instant = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return datetime.fromtimestamp(instant.timestamp(), tz=UTC)


class IdMapMismatchError(RecsysError):
    """A version's ID maps are not a prefix of the state's: its indices mean other ids here."""


class IdMapped(Protocol):
    def ids(self, side: str) -> np.ndarray: ...


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


RunMode = Literal["full", "refresh"]


class Gate(StrEnum):
    """The gates stages write and promotion reads: one name each (the file ``gates/<name>.json``)."""

    EVALUATION = "evaluation"
    INDEX = "index"
    VALIDATION = "validation"
    REFRESH = "refresh"  # a fold-in stayed close to its weekly parent (no escalation)


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

    @classmethod
    def from_airflow(cls, context: Mapping[str, Any], mode: RunMode = "full") -> RunContext:
        """The run described by an Airflow task context; its params (the typed trigger params, then
        ``config_overrides``) override the config."""
        return cls.open(
            context["dag"].dag_id,
            context["run_id"],
            *run_window(
                getattr(context.get("dag_run"), "run_type", ""),
                context.get("logical_date"),
                context["data_interval_start"],
                context["data_interval_end"],
            ),
            mode,
            overrides=run_overrides(dict(context["params"]), load_config()),
        )

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
        return StateLayout(self.config.state_home)

    @property
    def ingest_staging(self) -> Path:
        """Where ingest stages the classified records of this run before they reach the lake."""
        return self.run_dir / "ingest_staging"  # no leading "_": Spark warns that it ignores such paths

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

    def mark_published(self, model: str, version: str) -> None:
        """Record that this run became ``model`` version ``version``: in its folder, which freezes it,
        and as the window's pointer."""
        record = {"model": model, "version": version, "run_id": self.run_id, "run_dir": self.run_slug}
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

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    # interactions/: written by the Spark interactions stage, read by every later stage.
    @property
    def interactions_dir(self) -> Path:
        return self.stage_dir("interactions")

    def id_map_dir(self, side: Side) -> Path:
        return self.interactions_dir / "maps" / side

    def ids(self, side: Side) -> np.ndarray:
        """The source ids of one side, positioned by dense index."""
        return read_id_map(self.id_map_dir(side))

    def check_maps_extend(self, version: IdMapped, name: str) -> None:
        """Refuse to match ``version``'s vectors to this run's rows by index unless this run's ID maps
        extend its maps (they are append-only: an index, once given, keeps its id)."""
        for side in SIDES:
            older, newer = version.ids(side), self.ids(side)
            if len(older) > len(newer) or not np.array_equal(older, newer[: len(older)]):
                raise IdMapMismatchError(
                    f"the {side} ID map of this run does not extend version {name}'s ({len(older)} ids, "
                    f"this run {len(newer)}): the state's maps were lost or replaced, so its vectors "
                    "would land on other rows. Restore the state's id_maps (the published bundles hold "
                    "each version's maps) before running again"
                )

    def matrix_shape(self) -> tuple[int, int]:
        return count_rows(self.id_map_dir("users")), count_rows(self.id_map_dir("items"))

    def train_triples(self) -> Triples:
        return read_matrix(self.interactions_dir / "train")

    def holdout_triples(self) -> Triples:
        return read_matrix(self.interactions_dir / "holdout")

    def train_matrix(self) -> sp.csr_matrix:
        """The training confidences as a (users x items) CSR matrix."""
        return self.train_triples().to_csr(*self.matrix_shape())

    def holdout_matrix(self) -> sp.csr_matrix:
        return self.holdout_triples().to_csr(*self.matrix_shape())

    def recent(self, side: Side) -> np.ndarray:
        """Dense indices active in the run's own interval."""
        return read_indices(self.interactions_dir / "recent" / side)

    def input_fingerprint(self) -> str:
        return (self.interactions_dir / "fingerprint.txt").read_text().strip()

    # model/: the embeddings a run trained or refreshed, with how they were made.
    @property
    def model_dir(self) -> Path:
        return self.stage_dir("model")

    def write_model(
        self,
        embeddings: Embeddings,
        losses: list[float],
        params: AlsConfig,
        sweep_summary: dict[str, Any] | None = None,
    ) -> None:
        with atomic_dir(self.model_dir) as staging:
            write_model_dir(staging, embeddings, losses, params, sweep_summary)

    def embeddings(self) -> Embeddings:
        """The vectors later stages index, evaluate, serve and publish (see ``served_model_dir``)."""
        return read_embeddings(self.served_model_dir)

    # content/: item content vectors, their map into the factor space, and the model served with them.
    @property
    def content_dir(self) -> Path:
        return self.stage_dir("content")

    @property
    def served_model_dir(self) -> Path:
        """The content stage's model (collaborative vectors plus cold items') where it ran, else the
        trained or refreshed one: training's own output stays as it was, so either stage can re-run."""
        served = self.content_dir / "model"
        return served if served.is_dir() else self.model_dir

    def training_losses(self) -> list[float]:
        return [float(loss) for loss in json.loads((self.model_dir / TRAINING_LOSS).read_text())]

    def trained_params(self) -> AlsConfig:
        return read_trained_params(self.model_dir, self.config.als)

    def sweep_summary(self) -> dict[str, Any] | None:
        path = self.model_dir / SWEEP
        return json.loads(path.read_text()) if path.is_file() else None

    # refresh/: a nightly run's lineage and its escalation decision.
    def write_refresh_record(self, record: RefreshRecord) -> None:
        with atomic_dir(self.stage_dir("refresh")) as staging:
            write_json(staging / "refresh.json", asdict(record))

    def refresh_record(self) -> RefreshRecord | None:
        return read_refresh_record(self.run_dir)

    @property
    def parent_drift_dir(self) -> Path:
        """A refresh's drift against its weekly parent (``drift.write_report``)."""
        return self.stage_dir("parent_drift")

    @property
    def index_dir(self) -> Path:
        return self.stage_dir("index")

    @property
    def recommendations_file(self) -> Path:
        return self.stage_dir("recommendations") / "recommendations.parquet"

    @property
    def validation_dir(self) -> Path:
        return self.stage_dir("validation")

    @property
    def bundle_dir(self) -> Path:
        return self.stage_dir("bundle")

    def write_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        write_json(self.run_dir / "metrics" / f"{stage}.json", metrics)

    def read_metrics(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for path in sorted((self.run_dir / "metrics").glob("*.json")):
            merged.update(json.loads(path.read_text()))
        return merged

    def write_gate(self, gate: Gate, passed: bool, reasons: list[str], **details: Any) -> None:
        write_json(self.run_dir / "gates" / f"{gate}.json", {"passed": passed, "reasons": reasons, **details})

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

    def read_gates(self) -> dict[str, dict[str, Any]]:
        """Each written gate's record by its name."""
        return {
            path.stem: json.loads(path.read_text())
            for path in sorted((self.run_dir / "gates").glob("*.json"))
        }


@dataclass(frozen=True)
class RefreshRecord:
    """What a nightly refresh did: its lineage (registry versions), counts, time and decision."""

    parent_version: str  # the weekly version the refreshed model descends from
    derived_from_version: str  # the champion it folded into
    refresh_day: str
    users_updated: int
    users_added: int
    items_added: int
    refresh_s: float
    solver: str
    escalate: bool
    reasons: list[str]

    # Registered with the version as tags and shown by ``recsys status``.
    LINEAGE_TAGS: ClassVar[tuple[str, ...]] = (
        "parent_version",
        "derived_from_version",
        "refresh_day",
        "users_updated",
        "users_added",
        "items_added",
        "refresh_s",
    )

    def tags(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in self.LINEAGE_TAGS}


def read_refresh_record(run_dir: Path) -> RefreshRecord | None:
    """The refresh record a nightly run wrote in ``run_dir``, if its fold-in got that far."""
    path = run_dir / "refresh" / "refresh.json"
    return RefreshRecord(**json.loads(path.read_text())) if path.is_file() else None


def run_window(
    run_type: str, logical_date: datetime | None, interval_start: datetime, interval_end: datetime
) -> tuple[datetime, datetime]:
    """A DAG run's data window: the interval Airflow gave it, except that a manual run covers the
    period (the interval's length) ending at its logical date.

    The REST API, the UI's trigger form and a triggering operator infer a manual interval from the
    logical date already; Airflow's CLI trigger infers it from the wall clock instead, which would
    train a run for 1998 on whatever the last week of real time holds.
    """
    if str(run_type).lower().endswith("manual") and logical_date is not None and logical_date != interval_end:
        return logical_date - (interval_end - interval_start), logical_date
    return interval_start, interval_end


def write_model_dir(
    directory: Path,
    embeddings: Embeddings,
    losses: list[float],
    params: AlsConfig,
    sweep_summary: dict[str, Any] | None = None,
) -> None:
    """A model folder: factors, loss per iteration, the hyperparameters used (and the sweep, if any)."""
    write_embeddings(directory, embeddings)
    write_json(directory / TRAINING_LOSS, losses)
    write_json(directory / TRAINED_PARAMS, {"backend": params.backend, **params.hyperparameters()})
    if sweep_summary is not None:
        write_json(directory / SWEEP, sweep_summary)


def read_trained_params(directory: Path, fallback: AlsConfig) -> AlsConfig:
    """The ALS settings a model folder was trained with (``fallback``'s where it records none)."""
    path = directory / TRAINED_PARAMS
    if not path.is_file():
        return fallback
    # Models trained before the popularity prior existed have no prior dimension.
    recorded = {"popularity_weight": 0.0} | json.loads(path.read_text())
    return fallback.with_params({name: recorded[name] for name in fallback.hyperparameters()}).model_copy(
        update={"backend": recorded.get("backend", fallback.backend)}
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


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    The old folder is renamed aside, then the new one into place: a crash between the two leaves
    the old one aside, and the next call over ``target`` puts it back before anything else."""
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(target)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def restore_set_aside(target: Path) -> None:
    """Undo what a crash inside :func:`atomic_dir` left: with no ``target``, the folder last set
    aside becomes it again; any other one set aside is removed."""
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda path: path.stat().st_mtime_ns)
    if aside and not target.exists():
        aside.pop().rename(target)
        _fsync_dir(target.parent)
    for leftover in aside:
        shutil.rmtree(leftover, ignore_errors=True)


def publish_snapshot(pointer: Path, build: Callable[[Path], None]) -> None:
    """Make ``pointer`` name a new immutable snapshot that ``build`` fills, with no moment at which it
    names nothing: the snapshot is a new folder beside it, ``pointer`` a symbolic link replaced in
    one ``rename``; the snapshot it named before is removed only after. Whatever step a crash
    interrupts, ``pointer`` names the old snapshot or the new one, complete (a left-over new snapshot
    is removed by the next call). A folder from before snapshots is moved into one first (the only
    step with a window, repaired by :func:`recover_pointer`)."""
    recover_pointer(pointer)
    snapshots = pointer.parent / SNAPSHOTS
    snapshots.mkdir(parents=True, exist_ok=True)
    previous = pointer.resolve() if pointer.is_symlink() else None
    for stale in [*snapshots.glob(f"{pointer.name}-*"), *snapshots.glob(f".{pointer.name}-*.tmp")]:
        if stale.resolve() != previous:
            shutil.rmtree(stale, ignore_errors=True)  # a crashed call's snapshot, never named
    if pointer.is_dir() and not pointer.is_symlink():
        legacy = snapshots / f"{pointer.name}-legacy"
        pointer.rename(legacy)
        _link(pointer, legacy)
        previous = legacy
    snapshot = snapshots / f"{pointer.name}-{uuid.uuid4().hex}"
    staging = snapshots / f".{snapshot.name}.tmp"
    build(staging)
    _fsync_tree(staging)
    staging.rename(snapshot)
    _link(pointer, snapshot)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def recover_pointer(pointer: Path) -> None:
    """Repair the one window :func:`publish_snapshot` has (moving a pre-snapshot folder aside)."""
    legacy = pointer.parent / SNAPSHOTS / f"{pointer.name}-legacy"
    if not pointer.exists() and not pointer.is_symlink() and legacy.is_dir():
        _link(pointer, legacy)


def _link(pointer: Path, snapshot: Path) -> None:
    link = pointer.with_name(f".{pointer.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(snapshot, pointer.parent), link)
    os.replace(link, pointer)
    _fsync_dir(pointer.parent)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in sorted({root, *(path.parent for path in root.rglob("*"))}):
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


SNAPSHOTS = ".snapshots"


def _staged_json(path: Path, payload: Any) -> Path:
    """``payload`` as JSON in a temporary sibling of ``path``, on disk (fsynced) before it takes the
    name: a crash keeps one whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with staging.open("w") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    return staging


def write_json(path: Path, payload: Any) -> None:
    _staged_json(path, payload).replace(path)
    _fsync_dir(path.parent)


def create_json(path: Path, payload: Any) -> bool:
    """Write ``payload`` to ``path`` only if nothing is there yet (a hard link fails on an existing
    name, atomically); False when another writer was first."""
    staging = _staged_json(path, payload)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink()
    _fsync_dir(path.parent)
    return True


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)
