"""Precompute top-N lists for the run's active users through the run's index."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_pipeline.embeddings import presence_mask
from recsys_pipeline.index import load_index
from recsys_pipeline.recommendations import active_user_indices, recommend_for_users
from recsys_pipeline.runs import RunContext, atomic_dir


def run_batch_recommendations(run: RunContext) -> dict[str, float]:
    """Write ``run.recommendations_file``: unseen items for every user active in the last ``active_days``."""
    n_users, n_items = run.matrix_shape()
    train = run.train_triples()
    seen = (train.to_csr(n_users, n_items) + run.holdout_matrix()).tocsr()
    embeddings = run.embeddings()
    has_vector = presence_mask(embeddings.user_idx, n_users)
    user_ids, item_ids = run.ids("users"), run.ids("items")
    since = run.interval_end - timedelta(days=run.config.recommendations.active_days)
    with run.layout.lock(shared=True):
        active = active_user_indices(run.layout.events_lake, since, run.interval_end, user_ids)
    users, ranks, items, scores = recommend_for_users(
        active,
        embeddings.dense_users(n_users),
        has_vector,
        load_index(run.index_dir),
        seen,
        np.bincount(train.item_idx, minlength=n_items),
        run.config.recommendations.top_n,
    )
    table = pa.table(
        {
            "user_id": pa.array(user_ids[users].tolist(), pa.string()),
            "rank": pa.array(ranks.astype(np.int32)),
            "item_id": pa.array(item_ids[items].tolist(), pa.string()),
            "score": pa.array(scores),
        }
    )
    with atomic_dir(run.recommendations_file.parent) as staging:
        staging.mkdir(parents=True)
        pq.write_table(table, staging / run.recommendations_file.name)
    metrics = {
        "batch_active_users": float(len(active)),
        "batch_users_served": float(len(np.unique(users))),
        "batch_fallback_users": float((~has_vector[active]).sum()),
        "batch_coverage": len(np.unique(items)) / max(len(embeddings.item_idx), 1),
    }
    run.write_metrics("recommendations", metrics)
    return metrics
