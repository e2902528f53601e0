"""The store of one run's outputs: every path and file name of every stage in its run folder, with a
typed reader and writer each. A stage writes into a staging folder of the same shape (``*Files(staging)``)
that :func:`~recsys_pipeline.files.atomic_dir` swaps into place, and later stages read the folder
through the same class, so no other module names a file in a run folder.

Run folder (``<state>/runs/<dag_id>/<interval>/<run id>/``, see :class:`~recsys_pipeline.runs.RunContext`)::

    run.json reference.json published.json   the run's own records (runs.py)
    ingest_staging/         classified records on their way into the lake
    interactions/           train/, train_csr/, holdout/, history/, maps/{users,items}/,
                            recent/{users,items}/, fingerprint.txt
    model/                  user_factors.parquet, item_factors.parquet, training_loss.json, params.json,
                            sweep.json (after a sweep)
    content/                content_vectors.parquet, content_map.{parquet,json}, model/ (the served one)
    refresh/refresh.json    a nightly refresh's lineage and escalation decision
    parent_drift/           a nightly refresh's drift against its weekly parent, which validation
                            takes when the champion is that parent
    index/ recommendations/ validation/ bundle/
    metrics/<stage>.json    gates/<gate>.json
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.config import AlsConfig
from recsys_pipeline.embeddings import Embeddings, read_embeddings, write_embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir, write_json
from recsys_pipeline.tables import (
    Triples,
    count_rows,
    read_csr,
    read_csr_matrix,
    read_id_map,
    read_indices,
    read_matrix,
    rows_of,
    write_csr,
)

Side = Literal["users", "items"]
SIDES: tuple[Side, ...] = ("users", "items")
TRAIN_CSR = "train_csr"  # a run's training matrix as CSR arrays (InteractionsFiles.train_csr_dir)


class IdMapMismatchError(RecsysError):
    """A version's ID maps are not a prefix of the state's: its indices mean other ids here."""


class IdMapped(Protocol):
    def ids(self, side: str) -> np.ndarray: ...


@dataclass(frozen=True)
class InteractionsFiles:
    """``interactions/``: the ID maps as of the run, the train and holdout matrices, the pair history a
    later refresh carries forward, who was active in the run's interval, and the input fingerprint."""

    root: Path

    def map_dir(self, side: Side) -> Path:
        return self.root / "maps" / side

    def recent_dir(self, side: Side) -> Path:
        return self.root / "recent" / side

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def holdout_dir(self) -> Path:
        return self.root / "holdout"

    @property
    def train_csr_dir(self) -> Path:
        """The training matrix once more, as the CSR arrays every later stage starts from: at 20M
        events reading the Parquet pairs and converting them took 0.8-0.95 s per stage, loading the
        arrays 0.03-0.14 s. An erasure rewrites them with the Parquet pairs. A run written before they
        existed has none: its readers convert the Parquet pairs."""
        return self.root / TRAIN_CSR

    @property
    def history_dir(self) -> Path:
        return self.root / "history"

    @property
    def fingerprint_file(self) -> Path:
        return self.root / "fingerprint.txt"

    def ids(self, side: Side) -> np.ndarray:
        """The source ids of one side, positioned by dense index."""
        return read_id_map(self.map_dir(side))

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
        return count_rows(self.map_dir("users")), count_rows(self.map_dir("items"))

    def train_triples(self) -> Triples:
        if self.train_csr_dir.is_dir():
            return Triples.of_csr(self.train_matrix())
        return read_matrix(self.train_dir)

    def holdout_triples(self) -> Triples:
        return read_matrix(self.holdout_dir)

    def train_matrix(self) -> sp.csr_matrix:
        """The training confidences as a (users x items) CSR matrix."""
        n_users, n_items = self.matrix_shape()
        if self.train_csr_dir.is_dir():
            return read_csr(self.train_csr_dir, n_items)
        return read_csr_matrix(self.train_dir, n_users, n_items)

    def write_train_csr(self) -> None:
        """Write :attr:`train_csr_dir` from the training pairs."""
        write_csr(read_csr_matrix(self.train_dir, *self.matrix_shape()), self.train_csr_dir)

    def holdout_matrix(self) -> sp.csr_matrix:
        return self.holdout_triples().to_csr(*self.matrix_shape())

    def seen_matrix(self, train: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
        """What lists for the users ``users`` flags exclude: their training pairs (``train``) and
        held-out ones, as a (users x items) CSR matrix with no other user's rows."""
        seen = rows_of(train, users)
        holdout = self.holdout_triples()
        if holdout.nnz:  # a refresh holds nothing out
            n_users, n_items = train.shape
            seen = (seen + holdout.to_csr(n_users, n_items, users)).tocsr()
        return seen

    def recent(self, side: Side) -> np.ndarray:
        """Dense indices active in the run's own interval."""
        return read_indices(self.recent_dir(side))

    def write_fingerprint(self, fingerprint: str) -> None:
        self.fingerprint_file.write_text(f"{fingerprint}\n")

    def input_fingerprint(self) -> str:
        return self.fingerprint_file.read_text().strip()


TRAINED_PARAMS, TRAINING_LOSS, SWEEP = "params.json", "training_loss.json", "sweep.json"
ITEM_WEIGHTS = "item_weights.npy"  # the confidence weighting's per-item multipliers (als.item_weights)


@dataclass(frozen=True)
class ModelFiles:
    """A model folder: factors, loss per iteration, the hyperparameters used, the per-item confidence
    weights it was fitted with (if weighted) and the sweep (if any).

    ``als`` is what a folder that records no hyperparameters was trained with."""

    root: Path
    als: AlsConfig

    def write(
        self,
        embeddings: Embeddings,
        losses: list[float],
        params: AlsConfig,
        item_weights: np.ndarray | None,
        sweep_summary: dict[str, Any] | None = None,
    ) -> None:
        write_embeddings(self.root, embeddings)
        write_json(self.root / TRAINING_LOSS, losses)
        write_json(self.root / TRAINED_PARAMS, {"backend": params.backend, **params.hyperparameters()})
        if item_weights is not None:
            np.save(self.root / ITEM_WEIGHTS, item_weights.astype(np.float32), allow_pickle=False)
        if sweep_summary is not None:
            write_json(self.root / SWEEP, sweep_summary)

    def copy_to(self, target: ModelFiles, embeddings: Embeddings) -> None:
        """Write ``embeddings`` to ``target`` with this model's record (loss, params, weights, sweep)."""
        target.write(
            embeddings,
            self.training_losses(),
            self.trained_params(),
            self.item_weights(),
            self.sweep_summary(),
        )

    def exists(self) -> bool:
        return self.root.is_dir()

    def embeddings(self) -> Embeddings:
        return read_embeddings(self.root)

    def training_losses(self) -> list[float]:
        return [float(loss) for loss in json.loads((self.root / TRAINING_LOSS).read_text())]

    def trained_params(self) -> AlsConfig:
        """The ALS settings the model was trained with."""
        path = self.root / TRAINED_PARAMS
        if not path.is_file():
            return self.als
        # Models trained before the popularity prior (or the weighting, or its exponent) existed have none.
        recorded = {
            "popularity_weight": 0.0,
            "weighting": "none",
            "bm25_k1": 1.2,
            "bm25_idf_exponent": 1.0,
        } | json.loads(path.read_text())
        return self.als.with_params({name: recorded[name] for name in self.als.hyperparameters()}).model_copy(
            update={"backend": recorded.get("backend", self.als.backend)}
        )

    def item_weights(self) -> np.ndarray | None:
        """The per-item confidence weights the model was fitted with (None: unweighted)."""
        path = self.root / ITEM_WEIGHTS
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def sweep_summary(self) -> dict[str, Any] | None:
        path = self.root / SWEEP
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class ContentFiles:
    """``content/``: the items' content vectors, the map from them into the factor space, and the model
    served with them (collaborative vectors plus cold items')."""

    root: Path
    als: AlsConfig

    @property
    def vectors_file(self) -> Path:
        return self.root / "content_vectors.parquet"

    @property
    def map_weights_file(self) -> Path:
        return self.root / "content_map.parquet"

    @property
    def map_record_file(self) -> Path:
        return self.root / "content_map.json"

    @property
    def served(self) -> ModelFiles:
        return ModelFiles(self.root / SERVED_MODEL, self.als)


SERVED_MODEL = "model"  # inside content/: published as the bundle's embeddings, not with the content files


class Gate(StrEnum):
    """The gates stages write and promotion reads: one name each (the file ``gates/<name>.json``)."""

    EVALUATION = "evaluation"
    INDEX = "index"
    VALIDATION = "validation"
    REFRESH = "refresh"  # a fold-in stayed close to its weekly parent (no escalation)


@dataclass(frozen=True)
class RefreshLineage:
    """Where a nightly's model comes from, registered with its version as tags (``recsys status``
    shows them)."""

    parent_version: str  # the weekly version the refreshed model descends from
    derived_from_version: str  # the champion it folded into
    refresh_day: str
    users_updated: int
    users_added: int
    items_added: int
    refresh_s: float

    def tags(self) -> dict[str, str]:
        return {field.name: str(getattr(self, field.name)) for field in fields(self)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RefreshLineage:
        return cls(**{field.name: FIELD_TYPES[field.type](tags[field.name]) for field in fields(cls)})


FIELD_TYPES: dict[Any, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


@dataclass(frozen=True)
class RefreshRecord:
    """What a nightly refresh did: its lineage, counts, time and decision."""

    parent_version: str
    derived_from_version: str
    refresh_day: str
    users_updated: int
    users_added: int
    items_added: int
    refresh_s: float
    solver: str
    escalate: bool
    reasons: list[str]

    def lineage(self) -> RefreshLineage:
        return RefreshLineage(**{field.name: getattr(self, field.name) for field in fields(RefreshLineage)})


@dataclass(frozen=True)
class RunArtifacts:
    """Every output the stages of one run write into its folder ``run_dir``."""

    run_dir: Path
    als: AlsConfig  # what a model folder that records no hyperparameters was trained with

    @property
    def ingest_staging(self) -> Path:
        """Where ingest stages the classified records of this run before they reach the lake."""
        return self.run_dir / "ingest_staging"  # no leading "_": Spark warns that it ignores such paths

    @property
    def interactions(self) -> InteractionsFiles:
        """Written by the Spark interactions stage, read by every later stage."""
        return InteractionsFiles(self.run_dir / "interactions")

    @property
    def trained(self) -> ModelFiles:
        """The embeddings the run trained or refreshed, with how they were made."""
        return ModelFiles(self.run_dir / "model", self.als)

    def write_trained(
        self,
        embeddings: Embeddings,
        losses: list[float],
        params: AlsConfig,
        item_weights: np.ndarray | None,
        sweep_summary: dict[str, Any] | None = None,
    ) -> None:
        with atomic_dir(self.trained.root) as staging:
            ModelFiles(staging, self.als).write(embeddings, losses, params, item_weights, sweep_summary)

    @property
    def content(self) -> ContentFiles:
        return ContentFiles(self.run_dir / "content", self.als)

    @property
    def served(self) -> ModelFiles:
        """The model later stages index, evaluate, serve and publish: the content stage's where it ran,
        else the trained one. Training's own output stays as it was, so either stage can re-run."""
        served = self.content.served
        return served if served.exists() else self.trained

    @property
    def refresh_dir(self) -> Path:
        return self.run_dir / "refresh"

    def write_refresh_record(self, record: RefreshRecord) -> None:
        with atomic_dir(self.refresh_dir) as staging:
            write_json(staging / "refresh.json", asdict(record))

    def refresh_record(self) -> RefreshRecord | None:
        """The refresh record of a nightly run, if its fold-in got that far."""
        path = self.refresh_dir / "refresh.json"
        return RefreshRecord(**json.loads(path.read_text())) if path.is_file() else None

    @property
    def parent_drift_dir(self) -> Path:
        """A refresh's drift against its weekly parent (``drift.write_report``)."""
        return self.run_dir / "parent_drift"

    @property
    def index_dir(self) -> Path:
        return self.run_dir / "index"

    @property
    def recommendations_file(self) -> Path:
        return self.run_dir / "recommendations" / "recommendations.parquet"

    @property
    def validation_dir(self) -> Path:
        return self.run_dir / "validation"

    @property
    def bundle_dir(self) -> Path:
        return self.run_dir / "bundle"

    def write_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        write_json(self.run_dir / "metrics" / f"{stage}.json", metrics)

    def read_metrics(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for path in sorted((self.run_dir / "metrics").glob("*.json")):
            merged.update(json.loads(path.read_text()))
        return merged

    def write_gate(self, gate: Gate, passed: bool, reasons: list[str], **details: Any) -> None:
        write_json(self.run_dir / "gates" / f"{gate}.json", {"passed": passed, "reasons": reasons, **details})

    def read_gates(self) -> dict[str, dict[str, Any]]:
        """Each written gate's record by its name."""
        return {
            path.stem: json.loads(path.read_text())
            for path in sorted((self.run_dir / "gates").glob("*.json"))
        }
