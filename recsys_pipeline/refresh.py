"""Nightly refresh: fold new activity into the champion's model without a full retrain.

Item factors stay fixed while users with new activity (and users new since the weekly run)
are re-solved from their *whole* history; new items are solved from their users with user
factors fixed. Both are implicit's own least-squares updates (``partial_fit_items``,
``partial_fit_users``), so a folded-in vector is exactly the ALS solution for its row.

The refreshed model escalates to a full retrain when it no longer resembles its weekly
parent (drift beyond the ``drift:`` bounds), when too much of the catalogue is new, or when
the weekly parent is too old.
"""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_pipeline import drift
from recsys_pipeline.als import item_popularity, learned, weigh, weighted, with_popularity_prior
from recsys_pipeline.config import AlsConfig, PipelineConfig, RefreshConfig
from recsys_pipeline.embeddings import Embeddings, presence_mask
from recsys_pipeline.sets import distinct


def fold_in(
    parent: Embeddings,
    user_items: sp.csr_matrix,
    users: np.ndarray,
    new_items: np.ndarray,
    params: AlsConfig,
    config: RefreshConfig,
    item_weights: np.ndarray | None,
) -> Embeddings:
    """Solve ``new_items`` (users fixed), then ``users`` (items fixed) on the full ``user_items``,
    weighted by ``item_weights`` as the parent was trained (see :func:`~recsys_pipeline.als.weighted`)."""
    from implicit.cpu import _als
    from implicit.cpu.als import AlternatingLeastSquares

    n_users, n_items = user_items.shape
    threads = os.cpu_count() or 0
    model = AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        num_threads=threads,
    )
    parent_items = parent.dense_items(n_items)
    # Only the learned dimensions are solved; the popularity prior's (if any) is set again below.
    model.user_factors = np.ascontiguousarray(learned(parent.dense_users(n_users), params))
    model.item_factors = np.ascontiguousarray(learned(parent_items, params))
    popularity_today = item_popularity(user_items) if params.popularity_weight else None
    user_items = user_items.astype(np.float32, copy=False).tocsr()
    # Only the columns and rows solved are weighted, and only the columns transposed: a night solves
    # a few items and under half the users of a matrix of millions of pairs.
    with threadpool_limits(limits=1, user_api="blas"):
        if len(new_items):
            column_weights = item_weights[new_items] if item_weights is not None else None
            columns = weighted(user_items[:, new_items], params, column_weights)
            model.partial_fit_items(new_items, columns.T.tocsr())
        rows = weighted(user_items[users], params, item_weights)
        if len(users) and config.solver == "cholesky":
            model.partial_fit_users(users, rows)
        elif len(users):
            # Warm start from the parent's vector (zero for a new user); implicit's CG solver in place.
            vectors = np.ascontiguousarray(model.user_factors[users])
            confidence = (params.alpha * rows).astype(np.float32, copy=False).tocsr()
            _als.least_squares_cg(
                confidence,
                vectors,
                model.item_factors,
                params.regularization,
                num_threads=threads,
                cg_steps=config.cg_steps,
            )
            model.user_factors[users] = vectors
    user_idx = distinct(np.concatenate([parent.user_idx, users]))
    item_idx = distinct(np.concatenate([parent.item_idx, new_items]))
    # Items keep the popularity their vectors were fitted beside; new ones get today's.
    popularity = parent_items[:, -1].copy()
    if popularity_today is not None:
        popularity[new_items] = popularity_today[new_items]
    user_factors, item_factors = with_popularity_prior(
        model.user_factors[user_idx],
        model.item_factors[item_idx],
        popularity[item_idx],
        params.popularity_weight,
    )
    return Embeddings(
        user_idx,
        user_factors,
        item_idx,
        item_factors,
        cold_item_idx=np.setdiff1d(parent.cold_item_idx, new_items),
        prior_dims=1 if params.popularity_weight else 0,
    )


GRAM_BLOCK_ROWS = 65_536


class SessionSolver:
    """A user's learned vector from a handful of items, at request time: implicit's least-squares user
    update with the item factors fixed (what :func:`fold_in` solves for a user with the Cholesky
    solver). The items' Gram matrix plus regularisation is the same for every user, so it is formed
    once; each solve is then one k x k system over the session's items. A session's weights are
    weighted as the model's training confidences were (``item_weights``, see
    :func:`~recsys_pipeline.als.weighted`)."""

    def __init__(self, item_factors: np.ndarray, params: AlsConfig, item_weights: np.ndarray | None):
        self.items = np.ascontiguousarray(item_factors, dtype=np.float32)
        width = self.items.shape[1]
        # Summed in float64 a block at a time: no float64 copy of a catalogue of millions.
        gram = np.zeros((width, width))
        for start in range(0, len(self.items), GRAM_BLOCK_ROWS):
            block = self.items[start : start + GRAM_BLOCK_ROWS].astype(np.float64)
            gram += block.T @ block
        self.gram = gram + params.regularization * np.eye(width)
        self.params = params
        self.item_weights = item_weights

    def solve(self, item_idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The vector of a user with confidence ``weights`` on ``item_idx`` (repeats summed)."""
        items, position = np.unique(item_idx, return_inverse=True)
        summed = np.bincount(position, weights=weights, minlength=len(items))
        if self.item_weights is not None:
            summed = weigh(summed, self.item_weights[items], self.params).astype(np.float64)
        confidence = self.params.alpha * summed
        factors = self.items[items].astype(np.float64)
        system = self.gram + (factors.T * (confidence - 1.0)) @ factors
        return np.linalg.solve(system, factors.T @ confidence).astype(np.float32)


def rows_to_refresh(
    user_items: sp.csr_matrix, parent: Embeddings, recent_users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(users to re-solve, items to solve): active users plus any user with data but no vector; items
    with data but no learned vector (new ones, and cold ones whose content vector their interactions
    now replace)."""
    n_users, n_items = user_items.shape
    # Masks over the index space rather than set operations on index arrays: no sorting.
    with_data_users = np.diff(user_items.indptr) > 0
    with_data_items = np.bincount(user_items.indices, minlength=n_items) > 0
    users = with_data_users & (
        presence_mask(recent_users, n_users) | ~presence_mask(parent.user_idx, n_users)
    )
    items = with_data_items & ~presence_mask(parent.warm_items().item_idx, n_items)
    return np.flatnonzero(users), np.flatnonzero(items)


def escalation_reasons(
    *,
    new_items: int,
    catalogue_items: int,
    parent_data_end: datetime,
    run_end: datetime,
    drift_metrics: dict[str, float] | None,
    run_config: PipelineConfig,
) -> list[str]:
    """Why the refresh must give way to a full retrain (empty: it need not)."""
    config = run_config.refresh
    reasons = []
    share = new_items / max(catalogue_items, 1)
    if share > config.max_new_item_share:
        reasons.append(
            f"{new_items} new items are {share:.1%} of the catalogue, above "
            f"refresh.max_new_item_share={config.max_new_item_share:.1%}"
        )
    age_days = (run_end - parent_data_end).total_seconds() / 86_400
    if age_days > config.max_parent_age_days:
        reasons.append(
            f"the weekly parent's data ends {age_days:.1f} days before this run's, above "
            f"refresh.max_parent_age_days={config.max_parent_age_days}"
        )
    if drift_metrics is not None:
        reasons.extend(
            f"drift from the weekly parent: {v}" for v in drift.violations(drift_metrics, run_config.drift)
        )
    return reasons
