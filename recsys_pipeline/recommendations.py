"""Precompute top-N recommendations for active users, off-peak, so services can serve them by key lookup.

Output (``RunContext.recommendations_file``)::

    user_id STRING, rank INT (1 = best), item_id STRING, score FLOAT

Every active user (activity within ``recommendations.active_days`` before the interval
end) gets a list. Items the user interacted with in the window are never recommended.
Users without a vector get the most popular unseen items (``score`` is then the item's
training interaction count).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.index import ItemIndex
from recsys_pipeline.ranking import first_unseen, popular_items

BATCH_USERS = 1024
SCHEMA = pa.schema(
    [("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())]
)


def active_user_indices(lake: Path, since: datetime, until: datetime, user_ids: np.ndarray) -> np.ndarray:
    """Dense indices of users with an event in the lake between ``since`` and ``until``."""
    dataset = ds.dataset(str(lake), format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=["user_id"],
        filter=(ds.field("event_ts") >= since) & (ds.field("event_ts") < until),
    )
    active = set(table.column("user_id").unique().to_pylist())
    return np.flatnonzero(np.fromiter((user in active for user in user_ids), dtype=bool, count=len(user_ids)))


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def recommendation_batches(
    users: np.ndarray,
    user_vectors: np.ndarray,
    has_vector: np.ndarray,
    index: ItemIndex,
    seen: sp.csr_matrix,
    popularity: np.ndarray,
    top_n: int,
) -> Iterator[Batch]:
    """(user_idx, rank, item_idx, score) rows, ``BATCH_USERS`` users at a time: top-N unseen items per
    user, popular items without a vector. Memory is bounded by the batch, not by how many users."""
    popular = popular_items(popularity)
    popular_scores = popularity[popular].astype(np.float32)
    for start in range(0, len(users), BATCH_USERS):
        batch = users[start : start + BATCH_USERS]
        with_vector = batch[has_vector[batch]]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if len(with_vector):
            extra = int(np.diff(seen.indptr)[with_vector].max())
            items, scores = index.search(user_vectors[with_vector], top_n + extra)
            found = {int(u): (items[row], scores[row]) for row, u in enumerate(with_vector)}
        out_users, out_ranks, out_items, out_scores = [], [], [], []
        for user in batch:
            history = seen.indices[seen.indptr[user] : seen.indptr[user + 1]]
            ranked, ranked_scores = found.get(int(user), (popular, popular_scores))
            items, scores = first_unseen(ranked, ranked_scores, history, top_n)
            out_users.append(np.full(len(items), user))
            out_ranks.append(np.arange(1, len(items) + 1))
            out_items.append(items)
            out_scores.append(scores)
        yield (
            np.concatenate(out_users).astype(np.int64),
            np.concatenate(out_ranks).astype(np.int32),
            np.concatenate(out_items).astype(np.int64),
            np.concatenate(out_scores).astype(np.float32),
        )


def recommend_for_users(
    users: np.ndarray,
    user_vectors: np.ndarray,
    has_vector: np.ndarray,
    index: ItemIndex,
    seen: sp.csr_matrix,
    popularity: np.ndarray,
    top_n: int,
) -> Batch:
    """All of :func:`recommendation_batches` at once, for a few users."""
    batches = list(recommendation_batches(users, user_vectors, has_vector, index, seen, popularity, top_n))
    empty: Batch = (
        np.empty(0, np.int64),
        np.empty(0, np.int32),
        np.empty(0, np.int64),
        np.empty(0, np.float32),
    )
    return tuple(np.concatenate(parts) for parts in zip(empty, *batches, strict=True))  # type: ignore[return-value]


@dataclass
class WrittenRecommendations:
    users_served: int
    items: np.ndarray  # whether each item appears in some list


def write_recommendations(
    path: Path, batches: Iterable[Batch], user_ids: np.ndarray, item_ids: np.ndarray
) -> WrittenRecommendations:
    """Write the batches as Parquet (user_id, rank, item_id, score), one row group per batch; ids go
    from index to string inside Arrow, so no per-row Python string is ever made."""
    user_names, item_names = pa.array(user_ids, pa.string()), pa.array(item_ids, pa.string())
    shown = np.zeros(len(item_ids), dtype=bool)
    served = 0
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for users, ranks, items, scores in batches:
            writer.write_table(
                pa.table(
                    [user_names.take(users), pa.array(ranks), item_names.take(items), pa.array(scores)],
                    schema=SCHEMA,
                )
            )
            shown[items] = True
            served += len(np.unique(users))
    return WrittenRecommendations(served, shown)
