"""Precompute top-N recommendations for active users, off-peak, so services can serve them by key lookup.

Output (``RunContext.recommendations_file``)::

    user_id STRING, rank INT (1 = best), item_id STRING, score FLOAT

Every active user (activity within ``recommendations.active_days`` before the interval
end) gets a list. Items the user interacted with in the window are never recommended.
Users without a vector get the most popular unseen items (``score`` is then the item's
training interaction count).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import scipy.sparse as sp

from recsys_pipeline.index import ItemIndex
from recsys_pipeline.ranking import first_unseen, popular_items

BATCH_USERS = 1024


def active_user_indices(lake: Path, since: datetime, until: datetime, user_ids: np.ndarray) -> np.ndarray:
    """Dense indices of users with an event in the lake between ``since`` and ``until``."""
    dataset = ds.dataset(str(lake), format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=["user_id"],
        filter=(ds.field("event_ts") >= since) & (ds.field("event_ts") < until),
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
