"""Approximate nearest-neighbour index over item embeddings (ScaNN), measured against exact search.

Index folder layout::

    scann_assets.pbtxt, *.npy   ScaNN's own serialization, written with relative paths
    docids.npy                  the dense item index of each ScaNN searcher row (int64; ScaNN's own
                                docids pickle is never written or read)
    item_idx.npy, item_factors.npy   the exact backend's items and vectors
    manifest.json               {"format": 3, "backend", "files": {name: sha256}, "items": n, "params"}
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsys_pipeline.config import IndexConfig
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import file_sha256
from recsys_pipeline.ranking import dot_top_k

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# 2: ScaNN indexes carry docids, so they can be updated in place. 3: docids as .npy, never a pickle.
INDEX_FORMAT = 3
SCANN_DOCIDS_PICKLE = "scann_docids.pkl"
DOCIDS = "docids.npy"
# Query batches at least this big are split over ScaNN's threads.
PARALLEL_BATCH = 256
# The tuning walks reorder depths up to 2**(this - 1) times index.reorder.
REORDER_DOUBLINGS = 6
# Single queries timed per operating point for its latency percentiles.
LATENCY_QUERIES = 200
# Leaves hold at most about this many items. Measured on 10M log-normal-norm vectors: with sqrt(n)
# leaves (3,162 of ~3,200 items) recall 0.95 needed half the leaves searched (p99 11.5 ms); with
# 10,000 leaves, 5% of them (p99 3 ms).
MAX_ITEMS_PER_LEAF = 1000
# The tree trains on at least this many sampled items per leaf (k-means on fewer places leaves poorly).
TRAINING_ITEMS_PER_LEAF = 100
MIN_TRAINING_SAMPLE = 250_000


class IndexIntegrityError(RecsysError):
    """An index folder is incomplete or its files differ from its manifest."""


@dataclass(frozen=True)
class SearchParams:
    num_leaves: int | None
    leaves_to_search: int | None
    reorder: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_leaves": self.num_leaves,
            "leaves_to_search": self.leaves_to_search,
            "reorder": self.reorder,
        }


def search_params(n_items: int, config: IndexConfig) -> SearchParams:
    """Exact scoring for small catalogues; above, a tree of about sqrt(n) leaves (no more than
    ``MAX_ITEMS_PER_LEAF`` items each) with AH and reordering."""
    if n_items < config.brute_force_below:
        return SearchParams(None, None, config.reorder)
    leaves = config.num_leaves or max(2, int(math.sqrt(n_items)), n_items // MAX_ITEMS_PER_LEAF)
    return SearchParams(leaves, config.leaves_to_search or max(1, leaves // 20), config.reorder)


class ItemIndex(Protocol):
    """Nearest items by dot product, answering in dense item indices (``item_idx`` lists the items held)."""

    item_idx: np.ndarray

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (dense item indices, scores) per query row, best first. Safe to call from several
        threads at once (batch lists are made side by side), though not beside an update."""
        ...

    def upsert(self, item_idx: np.ndarray, vectors: np.ndarray) -> None:
        """Add new items and replace the vectors of items already held."""
        ...

    def delete(self, item_idx: np.ndarray) -> None: ...

    def save(self, directory: Path) -> None: ...


class ScannIndex:
    """ScaNN: brute force for small catalogues, tree + asymmetric hashing + reordering above."""

    backend = "scann"

    def __init__(self, searcher: Any, params: SearchParams):
        self.searcher = searcher
        self.params = params
        self.item_idx = self._held_items()

    def _held_items(self) -> np.ndarray:
        # ScaNN's docids (strings) are the dense item indices; searcher row r holds docids[r].
        return np.asarray(self.searcher.docids, dtype=np.int64)

    @classmethod
    def build(
        cls, item_idx: np.ndarray, item_factors: np.ndarray, params: SearchParams, k: int
    ) -> ScannIndex:
        import scann

        vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
        builder = scann.scann_ops_pybind.builder(vectors, k, "dot_product")
        if params.num_leaves is None:
            builder = builder.score_brute_force()
        else:
            builder = (
                builder.tree(
                    num_leaves=params.num_leaves,
                    num_leaves_to_search=params.leaves_to_search,
                    training_sample_size=min(
                        len(vectors), max(MIN_TRAINING_SAMPLE, TRAINING_ITEMS_PER_LEAF * params.num_leaves)
                    ),
                )
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(params.reorder)
            )
        # Docids make the searcher updatable in place (upsert/delete) by the nightly refresh.
        return cls(builder.build(docids=[str(i) for i in item_idx]), params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.item_idx))
        # The pybind searcher answers in rows; the wrapper's per-row docid strings would cost more than
        # the search itself, and row r holds item_idx[r].
        rows, scores = self.searcher.searcher.search_batched(
            np.ascontiguousarray(queries, dtype=np.float32),
            k,
            max(self.params.reorder, k) if self.params.num_leaves else -1,
            self.params.leaves_to_search or -1,
            len(queries) >= PARALLEL_BATCH,
            PARALLEL_BATCH,
        )
        return self.item_idx[np.asarray(rows, dtype=np.int64)], np.asarray(scores, dtype=np.float32)

    def with_params(self, params: SearchParams) -> ScannIndex:
        """The same searcher queried with other search-time settings (leaves searched, reorder)."""
        return ScannIndex(self.searcher, params)

    def upsert(self, item_idx: np.ndarray, vectors: np.ndarray) -> None:
        if len(item_idx):
            self.searcher.upsert(
                [str(i) for i in item_idx], np.ascontiguousarray(vectors, dtype=np.float32), len(item_idx)
            )
            self.item_idx = self._held_items()

    def delete(self, item_idx: np.ndarray) -> None:
        if len(item_idx):
            self.searcher.delete([str(i) for i in item_idx])
            self.item_idx = self._held_items()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.searcher.serialize(str(directory), relative_path=True)
        # ScaNN pickles its docids beside the index; a bundle holds no pickle, so they go to .npy.
        (directory / SCANN_DOCIDS_PICKLE).unlink(missing_ok=True)
        np.save(directory / DOCIDS, self.item_idx, allow_pickle=False)
        write_manifest(directory, self.backend, len(self.item_idx), self.params.as_dict())

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> ScannIndex:
        import scann

        if not (directory / DOCIDS).is_file():
            raise IndexIntegrityError(f"ScaNN index in {directory} has no {DOCIDS}")
        loaded = scann.scann_ops_pybind.load_searcher(str(directory))
        docids = [str(i) for i in np.load(directory / DOCIDS, allow_pickle=False)]
        searcher = scann.scann_ops_pybind.ScannSearcher(loaded.searcher, docids)
        return cls(searcher, SearchParams(**manifest["params"]))


class ExactIndex:
    """Exact search by batched matrix product: the reference the ScaNN index is measured against."""

    backend = "exact"

    def __init__(self, item_idx: np.ndarray, item_factors: np.ndarray):
        self.item_idx = np.asarray(item_idx, dtype=np.int64)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = exact_search(np.asarray(queries, dtype=np.float32), self.item_factors, k)
        return self.item_idx[rows], scores

    def upsert(self, item_idx: np.ndarray, vectors: np.ndarray) -> None:
        position = {int(item): row for row, item in enumerate(self.item_idx)}
        known = np.array([int(i) in position for i in item_idx], dtype=bool)
        rows = np.array([position[int(i)] for i in item_idx[known]], dtype=np.int64)
        self.item_factors[rows] = vectors[known]
        self.item_idx = np.concatenate([self.item_idx, np.asarray(item_idx, dtype=np.int64)[~known]])
        self.item_factors = np.vstack([self.item_factors, np.asarray(vectors, dtype=np.float32)[~known]])

    def delete(self, item_idx: np.ndarray) -> None:
        keep = ~np.isin(self.item_idx, item_idx)
        self.item_idx, self.item_factors = self.item_idx[keep], self.item_factors[keep]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "item_idx.npy", self.item_idx)
        np.save(directory / "item_factors.npy", self.item_factors)
        write_manifest(directory, self.backend, len(self.item_idx), {})

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> ExactIndex:
        return cls(
            np.load(directory / "item_idx.npy", allow_pickle=False),
            np.load(directory / "item_factors.npy", allow_pickle=False),
        )


def build_index(
    backend: str, item_idx: np.ndarray, item_factors: np.ndarray, params: SearchParams, k: int
) -> ItemIndex:
    if backend == "exact":
        return ExactIndex(item_idx, item_factors)
    return ScannIndex.build(item_idx, item_factors, params, k)


def load_index(directory: Path) -> ItemIndex:
    """Load after checking every file against the manifest; never hands a damaged folder to a backend."""
    manifest = verify_manifest(directory)
    backend = manifest.get("backend")
    if backend == "exact":
        return ExactIndex.load(directory, manifest)
    if backend == "scann":
        return ScannIndex.load(directory, manifest)
    raise IndexIntegrityError(f"index in {directory} names an unknown backend {backend!r}")


def write_manifest(directory: Path, backend: str, items: int, params: dict[str, Any]) -> None:
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.name != MANIFEST}
    manifest = {"format": INDEX_FORMAT, "backend": backend, "files": files, "items": items, "params": params}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify_manifest(directory: Path) -> dict[str, Any]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise IndexIntegrityError(f"index folder {directory} has no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    if (directory / SCANN_DOCIDS_PICKLE).exists():
        raise IndexIntegrityError(f"index folder {directory} holds a pickle ({SCANN_DOCIDS_PICKLE}): refused")
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexIntegrityError(
            f"index format {manifest.get('format')} is not supported (expected {INDEX_FORMAT})"
        )
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise IndexIntegrityError(f"index file {name} listed in the manifest is missing from {directory}")
        if file_sha256(path) != expected:
            raise IndexIntegrityError(f"index file {name} in {directory} does not match its manifest hash")
    return manifest


def exact_search(
    queries: np.ndarray, item_factors: np.ndarray, k: int, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions and scores of the k highest dot products per query, best first."""
    return dot_top_k(queries, item_factors, k, batch_size=batch_size)


def exact_top_k(queries: np.ndarray, item_factors: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the true top-k (the ground truth for recall)."""
    return exact_search(queries, item_factors, k)[0]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found by the index."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size if truth.size else 1.0


def exact_truth(
    item_idx: np.ndarray, item_factors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, float]:
    """(the true top-k item indices per query, exact search's QPS)."""
    started = time.perf_counter()
    truth = np.asarray(item_idx)[exact_top_k(queries, item_factors, k)]
    return truth, len(queries) / max(time.perf_counter() - started, 1e-9)


def measure(
    index: ItemIndex, item_idx: np.ndarray, item_factors: np.ndarray, queries: np.ndarray, k: int
) -> dict[str, float]:
    """Recall@k of the index against exact search over (item_idx, item_factors), with the QPS of both
    and the index's one-query latency."""
    truth, exact_qps = exact_truth(item_idx, item_factors, queries, k)
    point = operating_point(index, queries, truth, k)
    return {**point.metrics(k), "exact_qps": exact_qps}


@dataclass(frozen=True)
class OperatingPoint:
    """What one search setting gives on the run's own queries."""

    params: SearchParams
    recall: float
    qps: float  # batched
    p50_ms: float  # one query at a time, one thread
    p99_ms: float

    def metrics(self, k: int) -> dict[str, float]:
        return {
            f"index_recall_at_{k}": self.recall,
            "index_qps": self.qps,
            "index_p50_ms": self.p50_ms,
            "index_p99_ms": self.p99_ms,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.params.as_dict(),
            **{name: value for name, value in vars(self).items() if name != "params"},
        }


def operating_point(index: ItemIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> OperatingPoint:
    started = time.perf_counter()
    found, _ = index.search(queries, k)
    qps = len(queries) / max(time.perf_counter() - started, 1e-9)
    timings = []
    for query in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        index.search(query[None, :], k)
        timings.append(time.perf_counter() - started)
    p50, p99 = np.percentile(np.asarray(timings) * 1000, [50, 99]) if timings else (0.0, 0.0)
    params = index.params if isinstance(index, ScannIndex) else SearchParams(None, None, 0)
    return OperatingPoint(params, recall_at_k(found, truth), qps, float(p50), float(p99))


def tuning_curve(
    index: ScannIndex, queries: np.ndarray, truth: np.ndarray, config: IndexConfig, k: int
) -> list[OperatingPoint]:
    """Operating points of a tree index from cheap to thorough.

    For each reorder depth (doubling: quantized scores of items with large norms err the most, and
    exact re-scoring of more candidates is cheap), more leaves are searched until recall reaches
    ``min_recall`` or latency passes ``max_p99_ms`` (from there searching more only costs more). Once
    two depths in a row reached recall, deeper ones would only be slower.
    """
    leaves = index.params.num_leaves or 1
    shares = (2, 5, 10, 20, 50, 100)
    searched = sorted(
        {index.params.leaves_to_search or 1, *(max(1, leaves * share // 100) for share in shares)}
    )
    curve: list[OperatingPoint] = []
    depths_reaching_recall = 0
    for doubling in range(REORDER_DOUBLINGS):
        reorder = index.params.reorder * 2**doubling
        for leaves_to_search in searched:
            point = operating_point(
                index.with_params(SearchParams(leaves, leaves_to_search, reorder)), queries, truth, k
            )
            curve.append(point)
            if point.recall >= config.min_recall or point.p99_ms > config.max_p99_ms:
                break
        depths_reaching_recall = depths_reaching_recall + 1 if curve[-1].recall >= config.min_recall else 0
        if depths_reaching_recall == 2:
            break
    return curve


def choose_point(curve: list[OperatingPoint], config: IndexConfig) -> OperatingPoint:
    """The fastest batched point within both targets; else the fastest one meeting recall (the gate
    then names its latency); else the most accurate (the gate names its recall)."""
    accurate = [point for point in curve if point.recall >= config.min_recall]
    within = [point for point in accurate if point.p99_ms <= config.max_p99_ms]
    if within:
        return max(within, key=lambda point: point.qps)
    if accurate:
        return min(accurate, key=lambda point: point.p99_ms)
    return max(curve, key=lambda point: (point.recall, point.qps))


def index_vectors(item_factors: np.ndarray, config: IndexConfig) -> np.ndarray:
    """The vectors an index holds: unit length for cosine, so a dot product ranks like a cosine
    (the query's norm does not change its ranking)."""
    if config.metric == "cosine":
        return item_factors / np.maximum(np.linalg.norm(item_factors, axis=1, keepdims=True), 1e-12)
    return item_factors


def build_tuned(
    item_idx: np.ndarray, item_factors: np.ndarray, queries: np.ndarray, config: IndexConfig, k: int
) -> tuple[ItemIndex, dict[str, float], list[OperatingPoint]]:
    """Build for the catalogue size and metric, then choose the search setting from the measured
    recall/latency curve on ``queries`` (see :func:`choose_point`): (index, metrics, curve)."""
    item_factors = index_vectors(item_factors, config)
    params = search_params(len(item_idx), config)
    started = time.perf_counter()
    index = build_index(config.backend, item_idx, item_factors, params, k)
    build_s = time.perf_counter() - started
    truth, exact_qps = exact_truth(item_idx, item_factors, queries, k)
    if isinstance(index, ScannIndex) and params.num_leaves:
        curve = tuning_curve(index, queries, truth, config, k)
        chosen = choose_point(curve, config)
        index = index.with_params(chosen.params)
        log.info("index search setting %s chosen from %d measured points", chosen.as_dict(), len(curve))
    else:
        chosen = operating_point(index, queries, truth, k)
        curve = [chosen]
    return index, {"index_build_s": build_s, **chosen.metrics(k), "exact_qps": exact_qps}, curve


def recall_queries(embeddings: Embeddings, sample_users: int) -> np.ndarray:
    """Real user vectors (a seeded sample) to measure an index's recall with."""
    rng = np.random.default_rng(0)
    sample = rng.choice(len(embeddings.user_idx), min(sample_users, len(embeddings.user_idx)), replace=False)
    return embeddings.user_factors[np.sort(sample)]


def changed_items(old: Embeddings, new: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """(items whose vector is new or different, items no longer present) from ``old`` to ``new``."""
    shared, old_rows, new_rows = np.intersect1d(old.item_idx, new.item_idx, return_indices=True)
    moved = shared[(old.item_factors[old_rows] != new.item_factors[new_rows]).any(axis=1)]
    added = np.setdiff1d(new.item_idx, old.item_idx)
    return np.union1d(moved, added), np.setdiff1d(old.item_idx, new.item_idx)


def update(
    index: ItemIndex,
    parent: Embeddings,
    embeddings: Embeddings,
    queries: np.ndarray,
    config: IndexConfig,
    k: int,
) -> tuple[ItemIndex, dict[str, float]]:
    """Upsert new and changed item vectors into the parent's index; rebuild if its recall falls short.

    Either way the index's recall against exact search is measured on ``queries`` and reported.
    """
    upserts, deletes = changed_items(parent, embeddings)
    vectors = index_vectors(embeddings.item_factors, config)
    started = time.perf_counter()
    index.upsert(upserts, vectors[np.searchsorted(embeddings.item_idx, upserts)])
    index.delete(deletes)
    metrics = {"index_update_s": time.perf_counter() - started}
    metrics.update(measure(index, embeddings.item_idx, vectors, queries, k))
    if not metrics.get(f"index_recall_at_{k}", 0.0) >= config.min_recall:
        log.warning("updated index recall below %.3f: rebuilding", config.min_recall)
        index, built, _ = build_tuned(embeddings.item_idx, embeddings.item_factors, queries, config, k)
        metrics.update(built)
        metrics["index_rebuilt"] = 1.0
    else:
        metrics["index_rebuilt"] = 0.0
    metrics.update({"index_upserted": float(len(upserts)), "index_deleted": float(len(deletes))})
    return index, metrics
