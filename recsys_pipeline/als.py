"""ALS trainers (``implicit`` or Spark MLlib) behind one interface, returning :class:`Embeddings`.

Only the rows with training data get a vector; every backend passes the same contract tests,
so later stages never see which one ran.

With ``als.popularity_weight`` > 0 every vector gets one more dimension, the popularity prior:
``log(1 + the item's total confidence)`` on the item side, the weight on the user side, so a score
is ALS's plus weight x log popularity and is still a dot product (the index, the batch lists and
serving need nothing else). Why: implicit ALS fits 0 to every unobserved pair alike, so an item
many users could have chosen but did not counts against it as much as a rare one; its scores rank
by taste relative to exposure and under-rank popular items a user goes on to pick. Measured on the
synthetic log (4M events, 100k users, 20k items): ALS alone loses to the most-popular list at every
regularization and confidence tried; with the prior it captures 45% of the oracle's lift over it.

With ``als.weighting: bm25`` (the default) ALS fits BM25 weights of the confidences rather than the
confidences themselves, as implicit's own examples do (``implicit.nearest_neighbours.bm25_weight``,
without its length normalisation): each confidence is saturated (``k1``) and multiplied by the item's
inverse document frequency (to the power ``bm25_idf_exponent``), so a pair counts more the rarer its
item. Why: on the same synthetic log the prior alone captures 46% of the oracle's lift, BM25 with
the prior 62% (saturation alone: 18%, IDF alone: 42%; the row-length normalisation changes
nothing). On MovieLens-100k's random split it is 0.01 nDCG@10 below raw confidences, within the
interval, so the sweep tries both. At 20M events and 100k items an exponent of 1.5 captures 60%
rather than 58.5% (docs/configuration.md, Training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_pipeline.config import AlsConfig
from recsys_pipeline.embeddings import Embeddings, scatter
from recsys_pipeline.errors import RecsysError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def item_weights(user_items: sp.csr_matrix, params: AlsConfig) -> np.ndarray | None:
    """Each item's confidence multiplier under ``params.weighting`` (None: unweighted): BM25's inverse
    document frequency, log(users) - log(1 + users with the item), implicit's formula, kept at or above 0
    (an item nearly every user has says nothing about any of them)."""
    if params.weighting == "none":
        return None
    users_with_item = np.bincount(user_items.indices, minlength=user_items.shape[1])
    idf = np.maximum(np.log(user_items.shape[0]) - np.log1p(users_with_item), 0.0)
    return (idf**params.bm25_idf_exponent).astype(np.float32)


def extended_item_weights(
    stored: np.ndarray | None, fitted_items: np.ndarray, user_items: sp.csr_matrix, params: AlsConfig
) -> np.ndarray | None:
    """The weights a model was fitted with, for a matrix that has grown since: the items it fitted
    (``fitted_items``) keep theirs, so re-solved vectors stay solutions of the same problem; every other
    item (new, or without data then) gets today's."""
    today = item_weights(user_items, params)
    if today is None or stored is None:
        return today
    kept = fitted_items[fitted_items < min(len(stored), len(today))]
    today[kept] = stored[kept]
    return today


def weigh(confidences: np.ndarray, weights: np.ndarray, params: AlsConfig) -> np.ndarray:
    """BM25's term weight of aggregated confidences (at most ``bm25_k1`` + 1) times the items' weights."""
    k1 = params.bm25_k1
    return (confidences * (k1 + 1.0) / (k1 + confidences) * weights).astype(np.float32)


def weighted(user_items: sp.csr_matrix, params: AlsConfig, weights: np.ndarray | None) -> sp.csr_matrix:
    """The confidences ALS fits: ``user_items`` itself when unweighted, else its BM25 weights."""
    if weights is None:
        return user_items
    matrix = user_items.tocsr()
    # New values over the same structure: at volume the index arrays are most of the matrix.
    return sp.csr_matrix(
        (weigh(matrix.data, weights[matrix.indices], params), matrix.indices, matrix.indptr),
        shape=matrix.shape,
    )


class ModelFitError(RecsysError):
    """Training could not produce usable factors from this input."""


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


@dataclass(frozen=True)
class WarmStart:
    """Where a fit starts instead of random factors: dense (all users, all items) x factors arrays from
    an earlier solution of the same problem, and the iterations that then suffice."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    iterations: int


def warm_start(
    start: Embeddings, start_params: AlsConfig, params: AlsConfig, shape: tuple[int, int]
) -> WarmStart | None:
    """A fit of ``params`` on a (users x items) matrix of ``shape``, started from ``start`` (last week's
    model, trained with ``start_params``), or None when it cannot seed it: warm starts off
    (``als.warm_start_iterations`` null), a backend that cannot resume (Spark MLlib's ALS takes no
    initial factors), or other hyperparameters (a weighting, regularization or alpha of their own make
    the earlier factors a different problem's solution). Rows the earlier model lacks (new users and
    items, or ones without data then) start as implicit starts every row, uniform in [0, 0.01); the
    append-only ID maps keep every other row where it was.

    Why: measured on the 20M synthetic log's second week, five iterations from last week's factors
    reach a lower training loss than fifteen from random ones (0.008280 against 0.008289) with the
    same held-out nDCG@10 (0.2689 against 0.2697, within its interval) in a third of the time; two
    score as five do (docs/configuration.md)."""
    iterations = params.warm_start_iterations
    if iterations is None:
        return None
    same_problem = {"factors", "weighting", "regularization", "alpha", "bm25_k1", "bm25_idf_exponent"}
    differing = sorted(
        name
        for name in same_problem
        if start_params.hyperparameters()[name] != params.hyperparameters()[name]
    )
    if params.backend != "implicit" or start_params.backend != "implicit" or differing:
        log.info(
            "final fit from random factors: backend %s after %s, differing %s",
            params.backend,
            start_params.backend,
            differing,
        )
        return None
    random = np.random.default_rng(params.random_state)
    factors = []
    for size, idx, vectors in (
        (shape[0], start.user_idx, start.user_factors),
        (shape[1], start.item_idx, start.item_factors),
    ):
        dense = random.random((size, params.factors), dtype=np.float32) * np.float32(0.01)
        kept = idx < size
        dense[idx[kept]] = learned(vectors[kept], params)
        factors.append(dense)
    return WarmStart(factors[0], factors[1], iterations)


class AlsTrainer(Protocol):
    """One ALS implementation. Every backend reads the same confidence matrix and config and
    returns dense (all users x factors, all items x factors) arrays; :func:`train` does the
    checks and keeps the rows that had data, so later stages never see which backend ran.
    """

    def fit(
        self,
        user_items: sp.csr_matrix,
        params: AlsConfig,
        start: WarmStart | None = None,
        track_loss: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """(user factors, item factors, training loss per iteration), from ``start`` if given; no
        loss without ``track_loss`` (a loss costs a pass over the matrix: a sweep scores its fits on
        held-out users instead)."""
        ...


class ImplicitTrainer:
    """``implicit``'s CPU ALS: confidence = alpha x value, loss reported after every iteration (when
    tracked)."""

    def fit(
        self,
        user_items: sp.csr_matrix,
        params: AlsConfig,
        start: WarmStart | None = None,
        track_loss: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        from implicit.cpu.als import AlternatingLeastSquares

        losses: list[float] = []
        # BLAS pinned to one thread: implicit parallelises over users itself and a multi-threaded
        # BLAS underneath oversubscribes the cores (implicit's documented advice).
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(
                factors=params.factors,
                regularization=params.regularization,
                alpha=params.alpha,
                iterations=params.iterations if start is None else start.iterations,
                use_cg=params.use_cg,
                calculate_training_loss=track_loss,
                random_state=params.random_state,
                num_threads=os.cpu_count() or 0,
            )
            if start is not None:  # implicit draws random factors only for a side left None
                model.user_factors = start.user_factors.copy()
                model.item_factors = start.item_factors.copy()
            model.fit(
                user_items,
                show_progress=False,
                callback=(lambda _it, _elapsed, loss: losses.append(float(loss))) if track_loss else None,
            )
        return np.asarray(model.user_factors), np.asarray(model.item_factors), losses


class SparkMllibTrainer:
    """Spark MLlib ALS with ``implicitPrefs``, for matrices that outgrow one machine.

    MLlib weighs confidence as 1 + alpha x value and scales regularization by each row's
    count (ALS-WR), so the same numbers regularise differently than in implicit; tune per
    backend. MLlib reports no loss, so the single loss returned is implicit's objective
    evaluated at the final factors, comparable across backends.
    """

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark

    def fit(
        self,
        user_items: sp.csr_matrix,
        params: AlsConfig,
        start: WarmStart | None = None,
        track_loss: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        from pyspark.ml.recommendation import ALS

        if start is not None:
            raise ModelFitError("Spark MLlib's ALS cannot start from given factors (see warm_start)")

        coo = user_items.tocoo()
        ratings = self.spark.createDataFrame(
            pa.table(
                {
                    "user": pa.array(coo.row.astype(np.int32)),
                    "item": pa.array(coo.col.astype(np.int32)),
                    "confidence": pa.array(coo.data.astype(np.float32)),
                }
            )
        )
        model = ALS(
            rank=params.factors,
            maxIter=params.iterations,
            regParam=params.regularization,
            alpha=params.alpha,
            implicitPrefs=True,
            seed=params.random_state,
            userCol="user",
            itemCol="item",
            ratingCol="confidence",
        ).fit(ratings)
        n_users, n_items = user_items.shape
        user_factors = _collect_factors(model.userFactors, n_users, params.factors)
        item_factors = _collect_factors(model.itemFactors, n_items, params.factors)
        losses = [implicit_loss(user_items, user_factors, item_factors, params)] if track_loss else []
        return user_factors, item_factors, losses


def _collect_factors(frame: DataFrame, size: int, factors: int) -> np.ndarray:
    table = frame.toArrow()
    ids = table.column("id").to_numpy()
    vectors = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return scatter(ids, vectors.reshape(-1, factors).astype(np.float32), size)


def implicit_loss(
    user_items: sp.csr_matrix, user_factors: np.ndarray, item_factors: np.ndarray, params: AlsConfig
) -> float:
    """implicit's normalised training objective for any factors (its own loss routine), over the
    dimensions ALS learned."""
    from implicit.cpu import _als

    confidence = (params.alpha * user_items).astype(np.float32, copy=False).tocsr()
    with threadpool_limits(limits=1, user_api="blas"):
        return float(
            _als.calculate_loss(
                confidence,
                np.ascontiguousarray(learned(user_factors, params), dtype=np.float32),
                np.ascontiguousarray(learned(item_factors, params), dtype=np.float32),
                params.regularization,
                num_threads=os.cpu_count() or 0,
            )
        )


def item_popularity(user_items: sp.csr_matrix) -> np.ndarray:
    """The prior's item side: log(1 + total confidence per item) of a user x item matrix."""
    return np.log1p(np.asarray(user_items.sum(axis=0), dtype=np.float64).ravel()).astype(np.float32)


def with_popularity_prior(
    user_factors: np.ndarray, item_factors: np.ndarray, popularity: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """The factors with the prior dimension appended (unchanged at weight 0: no dimension)."""
    if weight == 0:
        return user_factors, item_factors
    user_side = np.full((len(user_factors), 1), weight, dtype=np.float32)
    return (
        np.hstack([user_factors, user_side]).astype(np.float32),
        np.hstack([item_factors, popularity.reshape(-1, 1)]).astype(np.float32),
    )


def learned(factors: np.ndarray, params: AlsConfig) -> np.ndarray:
    """The dimensions ALS learned, without the popularity prior's."""
    return factors[:, : params.factors]


def check_finite(user_factors: np.ndarray, item_factors: np.ndarray, producer: str) -> None:
    """Nothing downstream may see a NaN or infinite factor."""
    if not (np.isfinite(user_factors).all() and np.isfinite(item_factors).all()):
        raise ModelFitError(
            f"{producer} produced NaN or infinite factors: lower alpha or raise regularization"
        )


def trainer_for(backend: str, spark: SparkSession | None = None) -> AlsTrainer:
    if backend == "implicit":
        return ImplicitTrainer()
    if backend == "spark":
        if spark is None:
            raise ModelFitError(
                "als.backend=spark needs a Spark session: train in the train job of jobs/run_stages.py "
                "(the weekly DAG submits it when als.backend is spark)"
            )
        return SparkMllibTrainer(spark)
    raise ModelFitError(f"unknown ALS backend {backend!r}: use implicit or spark")


def train(
    user_items: sp.csr_matrix,
    params: AlsConfig,
    spark: SparkSession | None = None,
    start: WarmStart | None = None,
    track_loss: bool = True,
) -> tuple[Embeddings, list[float]]:
    """Fit ALS with the configured backend on the weighted confidences (see :func:`item_weights`),
    from ``start`` if given (:func:`warm_start`); return embeddings of rows with data (with the
    popularity prior's dimension, if weighted) and the loss per iteration (none without
    ``track_loss``: implicit's loss took 0.65 s of each iteration's 3.3-4 s at 20M events)."""
    check_trainable(user_items, params.factors)
    confidences = weighted(user_items, params, item_weights(user_items, params))
    user_factors, item_factors, losses = trainer_for(params.backend, spark).fit(
        confidences, params, start, track_loss
    )
    user_factors = np.asarray(user_factors, dtype=np.float32)
    item_factors = np.asarray(item_factors, dtype=np.float32)
    check_finite(user_factors, item_factors, "training")
    user_factors, item_factors = with_popularity_prior(
        user_factors, item_factors, item_popularity(user_items), params.popularity_weight
    )
    user_idx = np.flatnonzero(np.diff(user_items.indptr) > 0)
    item_idx = np.flatnonzero(user_items.getnnz(axis=0) > 0)
    prior_dims = 1 if params.popularity_weight else 0
    return Embeddings(
        user_idx, user_factors[user_idx], item_idx, item_factors[item_idx], prior_dims=prior_dims
    ), losses
