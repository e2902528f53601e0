"""Precompute top-N lists for the run's active users through the run's index."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_pipeline.embeddings import presence_mask
from recsys_pipeline.events import history_window
from recsys_pipeline.files import atomic_dir
from recsys_pipeline.index import load_index
from recsys_pipeline.interactions import recent_indices
from recsys_pipeline.recommendations import (
    active_user_indices,
    carried_lists,
    recommendation_batches,
    write_recommendations,
)
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext


def run_batch_recommendations(run: RunContext) -> dict[str, float]:
    """Write the run's ``recommendations_file``: unseen items for every user active in the last
    ``active_days`` (a refresh computes only the users it re-solved and carries the rest over from its
    parent)."""
    n_users, n_items = run.artifacts.interactions.matrix_shape()
    embeddings = run.artifacts.served.embeddings()
    has_vector = presence_mask(embeddings.user_idx, n_users)
    user_ids, item_ids = run.artifacts.interactions.ids("users"), run.artifacts.interactions.ids("items")
    active = active_users(run, user_ids, n_items)
    fresh = active
    carried: Iterable[pa.Table] = ()
    record = run.artifacts.refresh_record()
    if record is not None:
        parent = Registry(run.config).version_bundle(record.derived_from_version)
        if parent.recommendations_file.is_file():
            changed = presence_mask(run.artifacts.interactions.recent("users"), n_users) | (
                has_vector & ~presence_mask(parent.embeddings().user_idx, n_users)
            )
            fresh = active[changed[active]]
            carried = carried_lists(parent.recommendations_file, user_ids[active[~changed[active]]])
    # Of the users the lists are computed for (a refresh's are under half of them).
    train = run.artifacts.interactions.train_matrix()
    seen = run.artifacts.interactions.seen_matrix(train, presence_mask(fresh, n_users))
    batches = recommendation_batches(
        fresh,
        embeddings.dense_users(n_users),
        has_vector,
        load_index(run.artifacts.index_dir),
        seen,
        np.bincount(train.indices, minlength=n_items),
        run.config.recommendations.top_n,
    )
    with atomic_dir(run.artifacts.recommendations_file.parent) as staging:
        staging.mkdir(parents=True)
        written = write_recommendations(
            staging / run.artifacts.recommendations_file.name, batches, user_ids, item_ids, carried
        )
    metrics = {
        "batch_active_users": float(len(active)),
        "batch_users_computed": float(len(fresh)),
        "batch_users_served": float(written.users_served),
        "batch_fallback_users": float((~has_vector[active]).sum()),
        "batch_coverage": float(written.items.sum()) / max(len(embeddings.item_idx), 1),
    }
    run.artifacts.write_metrics("recommendations", metrics)
    return metrics


def active_users(run: RunContext, user_ids: np.ndarray, n_items: int) -> np.ndarray:
    """Dense indices of the users with an event in the last ``recommendations.active_days`` of the run
    (erased users aside: their ids are gone).

    Every event the run's pair history covers is its pair's latest or earlier than it, so the users
    with a pair that recent are those with such an event: read so from a few integer columns, where
    the lake's string ids took 1.2 s at 20M events. Only days before the history (a training window
    shorter than the active one) are read from the lake.
    """
    since = run.interval_end - timedelta(days=run.config.recommendations.active_days)
    history_start, _ = history_window(run)
    interactions = run.artifacts.interactions
    recent, _ = recent_indices(interactions.history_dir, max(since, history_start), (len(user_ids), n_items))
    active = presence_mask(recent, len(user_ids))
    if since < history_start:
        with run.layout.lock(shared=True):
            active[active_user_indices(run.layout.events_lake, since, history_start, user_ids)] = True
    return np.flatnonzero(active & pd.notna(user_ids))
