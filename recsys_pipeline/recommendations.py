"""Precompute top-N recommendations for active users, off-peak, so services can serve them by key lookup.

Output (``RunContext.recommendations_file``)::

    user_id STRING, rank INT (1 = best), item_id STRING, score FLOAT

Every active user (activity within ``recommendations.active_days`` before the interval
end) gets a list. A nightly refresh computes lists only for the users it re-solved and carries the
others' over from the version it folded into (their vectors did not change; items new that day
reach them at the next weekly run or when they come back). Items the user interacted with in the
window are never recommended. Users without a vector get the most popular unseen items (``score``
is then the item's training interaction count).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.index import ItemIndex
from recsys_pipeline.ranking import NO_ITEM, first_unseen_rows, popular_items

BATCH_USERS = 1024
# Threads making lists side by side (:func:`made_ahead`).
WORKERS = os.cpu_count() or 1
T = TypeVar("T")
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
    active = pc.is_in(pa.array(user_ids, pa.string()), value_set=pc.unique(table.column("user_id")))
    return np.flatnonzero(active.to_numpy(zero_copy_only=False))


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
    """(user_idx, rank, item_idx, score) rows, ``BATCH_USERS`` users at a time, in order: top-N unseen
    items per user, popular items without a vector, made by ``WORKERS`` threads ahead of the caller
    (:func:`made_ahead`). Memory is bounded by the batches in hand, not by how many users."""
    popular = popular_items(popularity)
    lists = ListMaker(
        user_vectors, has_vector, index, seen, popular, popularity[popular].astype(np.float32), top_n
    )
    starts = range(0, len(users), BATCH_USERS)
    return made_ahead(lists, (users[start : start + BATCH_USERS] for start in starts), WORKERS)


@dataclass(frozen=True)
class ListMaker:
    """Makes the lists of a batch of users (:func:`recommendation_batches`); read-only, so batches
    are made on several threads at once."""

    user_vectors: np.ndarray
    has_vector: np.ndarray
    index: ItemIndex
    seen: sp.csr_matrix
    popular: np.ndarray
    popular_scores: np.ndarray
    top_n: int

    def __call__(self, batch: np.ndarray) -> Batch:
        top_n = self.top_n
        seen_batch = self.seen[batch]
        history = np.diff(seen_batch.indptr)
        # Most users' top-N survives a margin of top_n seen items; the few who lose more to their
        # history are searched again as deep as their history, so one heavy user does not deepen
        # every search of the batch.
        picked, picked_scores, counts = self.first_unseen(
            batch, seen_batch, top_n + min(int(history.max(initial=0)), top_n)
        )
        short = np.flatnonzero((counts < top_n) & (history > top_n))
        if len(short):
            deeper = self.first_unseen(batch[short], seen_batch[short], top_n + int(history[short].max()))
            picked[short], picked_scores[short], counts[short] = deeper
        shown = np.arange(top_n)[None, :] < counts[:, None]
        return (
            np.repeat(batch, counts).astype(np.int64),
            np.broadcast_to(np.arange(1, top_n + 1, dtype=np.int32), picked.shape)[shown],
            picked[shown].astype(np.int64),
            picked_scores[shown].astype(np.float32),
        )

    def first_unseen(
        self, batch: np.ndarray, seen_batch: sp.csr_matrix, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's top-N unseen among ``width`` candidates each: the index's best for users with
        a vector, the popular list for the others."""
        items = np.full((len(batch), width), NO_ITEM, dtype=np.int64)
        scores = np.zeros((len(batch), width), dtype=np.float32)
        head = min(width, len(self.popular))
        items[:, :head], scores[:, :head] = self.popular[:head], self.popular_scores[:head]
        personal = np.flatnonzero(self.has_vector[batch])
        if len(personal):
            found, found_scores = self.index.search(self.user_vectors[batch[personal]], width)
            items[personal], scores[personal] = NO_ITEM, 0.0
            items[personal, : found.shape[1]], scores[personal, : found.shape[1]] = found, found_scores
        return first_unseen_rows(items, scores, seen_batch, self.top_n)


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
    path: Path,
    batches: Iterable[Batch],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    carried: Iterable[pa.Table] = (),
) -> WrittenRecommendations:
    """Write the batches as Parquet (user_id, rank, item_id, score), one row group per batch, then
    the ``carried`` lists as they are; ids go from index to string inside Arrow, so no per-row Python
    string is ever made."""
    user_names, item_names = pa.array(user_ids, pa.string()), pa.array(item_ids, pa.string())
    shown = np.zeros(len(item_ids), dtype=bool)
    served = np.zeros(len(user_ids), dtype=bool)
    carried_users: list[pa.Array] = []
    carried_items: list[pa.Array] = []
    # A user's id repeats down their whole list, which plain encoding and compression keep as small
    # as a dictionary would, without hashing every row of every list. The ids get no min/max
    # statistics: lists go in index order, in which ids follow no order a reader could skip row groups
    # by, and comparing every id took 0.35-0.5 s of the 1.2-1.8 s that writing 25M rows took.
    with pq.ParquetWriter(
        path, SCHEMA, use_dictionary=["item_id"], write_statistics=["rank", "score"]
    ) as writer:
        for users, ranks, items, scores in batches:
            writer.write_table(
                pa.table(
                    [user_names.take(users), pa.array(ranks), item_names.take(items), pa.array(scores)],
                    schema=SCHEMA,
                )
            )
            shown[items] = True
            served[users] = True
        for table in carried:
            writer.write_table(table)
            users = table.column("user_id")
            carried_users.extend(users.take(list_starts(users)).chunks)
            carried_items.append(pc.unique(table.column("item_id")))
    # Ids carried are looked up once, deduplicated, rather than row by row.
    for names, found, flags in ((user_names, carried_users, served), (item_names, carried_items, shown)):
        if found:
            ids = pc.unique(pa.concat_arrays(found))
            flags[pc.index_in(ids, value_set=names).drop_null().to_numpy()] = True
    return WrittenRecommendations(int(served.sum()), shown)


def made_ahead(make: Callable[[T], Batch], inputs: Iterable[T], workers: int) -> Iterator[Batch]:
    """``make`` of each of ``inputs``, handed out in order, made by ``workers`` threads up to twice as
    many ahead of the caller. The index search, the lookups of seen items and Arrow's writing of the
    batches before all release the GIL: a 20M-event week's 500k lists were made and written in
    6.4-6.6 s by two threads, in 9.5-9.6 s by one beside the writer (2 cores). Memory holds
    2 x ``workers`` batches more. A failure surfaces where its batch would have been handed out."""
    remaining = iter(inputs)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(make, item) for item in islice(remaining, 2 * workers))
        while pending:
            batch = pending.popleft().result()
            pending.extend(pool.submit(make, item) for item in islice(remaining, 1))
            yield batch


def carried_lists(path: Path, user_ids: np.ndarray, batch_rows: int = 1 << 22) -> Iterator[pa.Table]:
    """An earlier run's lists of the users ``user_ids`` names, ``batch_rows`` rows at a time, as they
    are stored: a list carried over needs no id lookups. A list is a run of one user's rows, so only
    each run's first row is looked up (:func:`list_starts`), not every row."""
    wanted = pa.array(user_ids, pa.string())
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        users = batch.column("user_id")
        starts = list_starts(users)
        carried = pc.is_in(users.take(starts), value_set=wanted).to_numpy(zero_copy_only=False)
        kept = np.repeat(carried, np.diff(starts, append=len(users)))
        yield pa.Table.from_batches([batch]).filter(kept).cast(SCHEMA)


def list_starts(users: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Where each run of equal ``users`` begins: the first row of each list in a lists file (written
    user by user), found by comparing each row with the one before instead of hashing every row."""
    if len(users) == 0:
        return np.empty(0, dtype=np.int64)
    changed = pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changed) + 1])
