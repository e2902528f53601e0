"""Precompute top-N recommendations for active users, off-peak, so services can serve them by key lookup.

Output ``<run_dir>/recommendations/recommendations.parquet``::

    user_id STRING, rank INT (1 = best), item_id STRING, score FLOAT

Every active user (activity within ``recommendations.active_days`` before the interval
end) gets a list. Items the user interacted with in the window are never recommended.
Users without a vector get the most popular unseen items (``score`` is then the item's
training interaction count).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.als import matrix_shape, read_embeddings
from recsys_pipeline.evaluate import first_unseen, popular_items
from recsys_pipeline.index import ItemIndex, load_index
from recsys_pipeline.runs import RunContext, atomic_dir
from recsys_pipeline.tables import read_id_map, read_matrix

BATCH_USERS = 1024


def active_user_indices(run: RunContext, user_ids: np.ndarray) -> np.ndarray:
    """Dense indices of users with an event in the last ``active_days`` of the run's interval."""
    since = run.interval_end - timedelta(days=run.config.recommendations.active_days)
    dataset = ds.dataset(str(run.layout.events_lake), format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=["user_id"],
        filter=(ds.field("event_ts") >= since) & (ds.field("event_ts") < run.interval_end),
    )
    active = set(table.column("user_id").unique().to_pylist())
    return np.flatnonzero(np.fromiter((user in active for user in user_ids), dtype=bool, count=len(user_ids)))


def recommend_for_users(
    users: np.ndarray,
    user_vectors: np.ndarray,
    has_vector: np.ndarray,
    index: ItemIndex,
    seen: sp.csr_matrix,
    popularity: np.ndarray,
    top_n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx, rank, item_idx, score) rows: top-N unseen items per user, popular items without a vector."""
    popular = popular_items(popularity)
    popular_scores = popularity[popular].astype(np.float32)
    out_users, out_ranks, out_items, out_scores = [], [], [], []
    for start in range(0, len(users), BATCH_USERS):
        batch = users[start : start + BATCH_USERS]
        with_vector = batch[has_vector[batch]]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if len(with_vector):
            extra = int(np.diff(seen.indptr)[with_vector].max())
            items, scores = index.search(user_vectors[with_vector], top_n + extra)
            found = {int(u): (items[row], scores[row]) for row, u in enumerate(with_vector)}
        for user in batch:
            history = seen.indices[seen.indptr[user] : seen.indptr[user + 1]]
            ranked, ranked_scores = found.get(int(user), (popular, popular_scores))
            items, scores = first_unseen(ranked, ranked_scores, history, top_n)
            out_users.append(np.full(len(items), user))
            out_ranks.append(np.arange(1, len(items) + 1))
            out_items.append(items)
            out_scores.append(scores)
    empty = np.empty(0, dtype=np.int64)
    return (
        np.concatenate(out_users or [empty]),
        np.concatenate(out_ranks or [empty]),
        np.concatenate(out_items or [empty]),
        np.concatenate(out_scores or [empty]).astype(np.float32),
    )


def run_batch_recommendations(run: RunContext) -> dict[str, float]:
    """Write top-N lists for the run's active users through the run's index."""
    interactions_dir = run.stage_dir("interactions")
    n_users, n_items = matrix_shape(interactions_dir)
    train = read_matrix(interactions_dir / "train")
    holdout = read_matrix(interactions_dir / "holdout")
    seen = (train.to_csr(n_users, n_items) + holdout.to_csr(n_users, n_items)).tocsr()
    embeddings = read_embeddings(run.stage_dir("model"))
    has_vector = np.zeros(n_users, dtype=bool)
    has_vector[embeddings.user_idx] = True
    user_ids = read_id_map(interactions_dir / "maps" / "users")
    item_ids = read_id_map(interactions_dir / "maps" / "items")
    active = active_user_indices(run, user_ids)
    users, ranks, items, scores = recommend_for_users(
        active,
        embeddings.dense_users(n_users),
        has_vector,
        load_index(run.stage_dir("index")),
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
    with atomic_dir(run.stage_dir("recommendations")) as staging:
        staging.mkdir(parents=True)
        pq.write_table(table, staging / "recommendations.parquet")
    served = len(np.unique(users))
    metrics = {
        "batch_active_users": float(len(active)),
        "batch_users_served": float(served),
        "batch_fallback_users": float((~has_vector[active]).sum()),
        "batch_coverage": len(np.unique(items)) / max(len(embeddings.item_idx), 1),
    }
    run.write_metrics("recommendations", metrics)
    return metrics
