"""Train ALS embeddings with ``implicit`` and store them as Parquet keyed by dense index.

Embedding files (``<run_dir>/model``)::

    user_factors.parquet   idx INT, factors FIXED_SIZE_LIST<FLOAT32>[factors]   users with training data
    item_factors.parquet   idx INT, factors FIXED_SIZE_LIST<FLOAT32>[factors]   items with training data
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_pipeline.config import AlsConfig
from recsys_pipeline.runs import RunContext, atomic_dir, write_json
from recsys_pipeline.tables import count_rows, read_matrix

log = logging.getLogger(__name__)


class ModelFitError(RuntimeError):
    """Training could not produce usable factors from this input."""


@dataclass(frozen=True)
class Embeddings:
    """Factors for the users and items that had training data.

    ``user_idx``/``item_idx`` are dense indices from the ID maps; row ``r`` of
    ``user_factors`` is the vector of user ``user_idx[r]``.
    """

    user_idx: np.ndarray
    user_factors: np.ndarray
    item_idx: np.ndarray
    item_factors: np.ndarray

    def dense_users(self, n_users: int) -> np.ndarray:
        """(n_users, factors) with zero rows for users without a vector."""
        return _scatter(self.user_idx, self.user_factors, n_users)

    def dense_items(self, n_items: int) -> np.ndarray:
        return _scatter(self.item_idx, self.item_factors, n_items)


def _scatter(idx: np.ndarray, factors: np.ndarray, size: int) -> np.ndarray:
    dense = np.zeros((size, factors.shape[1]), dtype=np.float32)
    dense[idx] = factors
    return dense


def check_trainable(user_items: sp.csr_matrix, factors: int) -> None:
    """Refuse inputs ALS cannot learn from, with a message naming the problem."""
    if user_items.nnz == 0:
        raise ModelFitError("the interaction matrix is empty")
    if not np.all(np.isfinite(user_items.data)):
        raise ModelFitError("the interaction matrix holds NaN or infinite confidences")
    if (user_items.data < 0).any():
        raise ModelFitError("the interaction matrix holds negative confidences")
    active_users = int((np.diff(user_items.indptr) > 0).sum())
    active_items = int((user_items.getnnz(axis=0) > 0).sum())
    if factors > min(active_users, active_items):
        raise ModelFitError(
            f"factors={factors} exceeds the {active_users} users / {active_items} items with data: "
            "lower als.factors or widen the window"
        )


def train(user_items: sp.csr_matrix, config: AlsConfig) -> tuple[Embeddings, list[float]]:
    """Fit ALS on a (users x items) confidence matrix; return embeddings and the loss per iteration.

    BLAS is pinned to one thread because implicit parallelises over users itself and a
    multi-threaded BLAS underneath oversubscribes the cores (implicit's documented advice).
    """
    from implicit.cpu.als import AlternatingLeastSquares

    check_trainable(user_items, config.factors)
    losses: list[float] = []
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            use_cg=config.use_cg,
            calculate_training_loss=True,
            random_state=config.random_state,
            num_threads=os.cpu_count() or 0,
        )
        model.fit(
            user_items, show_progress=False, callback=lambda _it, _elapsed, loss: losses.append(float(loss))
        )
    user_factors = np.asarray(model.user_factors, dtype=np.float32)
    item_factors = np.asarray(model.item_factors, dtype=np.float32)
    if not (np.isfinite(user_factors).all() and np.isfinite(item_factors).all()):
        raise ModelFitError("training produced NaN or infinite factors: lower alpha or raise regularization")
    user_idx = np.flatnonzero(np.diff(user_items.indptr) > 0)
    item_idx = np.flatnonzero(user_items.getnnz(axis=0) > 0)
    return Embeddings(user_idx, user_factors[user_idx], item_idx, item_factors[item_idx]), losses


def write_factors(path: Path, idx: np.ndarray, factors: np.ndarray) -> None:
    flat = pa.array(factors.astype(np.float32).ravel())
    vectors = pa.FixedSizeListArray.from_arrays(flat, factors.shape[1])
    pq.write_table(pa.table({"idx": pa.array(idx.astype(np.int32)), "factors": vectors}), path)


def read_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    column = table.column("factors").combine_chunks()
    width = column.type.list_size
    factors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)
    return table.column("idx").to_numpy().astype(np.int64), factors


def write_embeddings(directory: Path, embeddings: Embeddings) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_factors(directory / "user_factors.parquet", embeddings.user_idx, embeddings.user_factors)
    write_factors(directory / "item_factors.parquet", embeddings.item_idx, embeddings.item_factors)


def read_embeddings(directory: Path) -> Embeddings:
    user_idx, user_factors = read_factors(directory / "user_factors.parquet")
    item_idx, item_factors = read_factors(directory / "item_factors.parquet")
    return Embeddings(user_idx, user_factors, item_idx, item_factors)


def matrix_shape(interactions_dir: Path) -> tuple[int, int]:
    return count_rows(interactions_dir / "maps" / "users"), count_rows(interactions_dir / "maps" / "items")


def run_training(run: RunContext) -> dict[str, float]:
    """Train on the run's training matrix and write its embeddings."""
    interactions_dir = run.stage_dir("interactions")
    user_items = read_matrix(interactions_dir / "train").to_csr(*matrix_shape(interactions_dir))
    embeddings, losses = train(user_items, run.config.als)
    with atomic_dir(run.stage_dir("model")) as staging:
        write_embeddings(staging, embeddings)
        write_json(staging / "training_loss.json", losses)
    log.info("ALS loss per iteration: %s", ", ".join(f"{loss:.5f}" for loss in losses))
    metrics = {
        "training_loss": losses[-1],
        "trained_users": float(len(embeddings.user_idx)),
        "trained_items": float(len(embeddings.item_idx)),
    }
    run.write_metrics("train", metrics)
    return metrics
