import threading
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys_pipeline.index import ExactIndex
from recsys_pipeline.recommendations import active_user_indices, made_ahead, recommend_for_users
from recsys_pipeline.stages.recommend import active_users


def test_lists_skip_seen_items_and_fall_back_to_popular_without_a_vector() -> None:
    item_vectors = np.array([[1, 0], [0.9, 0], [0, 1], [0, 0.5]], dtype=np.float32)
    user_vectors = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]))
    users, ranks, items, scores = recommend_for_users(
        np.array([0, 1, 2]),
        user_vectors,
        np.array([True, True, False]),
        ExactIndex(np.arange(4), item_vectors),
        seen,
        np.array([5, 9, 1, 0]),
        top_n=2,
    )
    rows = list(zip(users.tolist(), ranks.tolist(), items.tolist(), strict=True))
    assert rows == [(0, 1, 1), (0, 2, 2), (1, 1, 2), (1, 2, 3), (2, 1, 0), (2, 2, 2)]
    assert scores[4] == 5  # popular fallback scores are interaction counts


def test_batch_output_covers_every_active_user_and_never_their_history(weekly_run) -> None:
    recs = pd.read_parquet(weekly_run.artifacts.recommendations_file)
    user_ids, item_ids = (
        weekly_run.artifacts.interactions.ids("users"),
        weekly_run.artifacts.interactions.ids("items"),
    )
    since = weekly_run.interval_end - timedelta(days=weekly_run.config.recommendations.active_days)
    active = set(
        user_ids[active_user_indices(weekly_run.layout.events_lake, since, weekly_run.interval_end, user_ids)]
    )
    assert active and set(recs["user_id"]) == active
    top_n = weekly_run.config.recommendations.top_n
    assert recs.groupby("user_id").size().eq(top_n).all()
    history: set[tuple[str, str]] = set()
    for matrix in (
        weekly_run.artifacts.interactions.train_triples(),
        weekly_run.artifacts.interactions.holdout_triples(),
    ):
        history |= set(zip(user_ids[matrix.user_idx], item_ids[matrix.item_idx], strict=True))
    assert not history & set(zip(recs["user_id"], recs["item_id"], strict=True))
    metrics = weekly_run.artifacts.read_metrics()
    assert metrics["batch_users_served"] == metrics["batch_active_users"] == len(active)


def test_active_users_beyond_a_shorter_training_window_come_from_the_lake(weekly_run) -> None:
    """With a training window of 7 days against 30 active ones, the users of the 23 days before it
    are read from the lake: the same users as the lake's whole 30 days."""
    user_ids = weekly_run.artifacts.interactions.ids("users")
    n_items = len(weekly_run.artifacts.interactions.ids("items"))
    lake, end = weekly_run.layout.events_lake, weekly_run.interval_end
    since = end - timedelta(days=weekly_run.config.recommendations.active_days)
    from_lake = active_user_indices(lake, since, end, user_ids)
    assert len(active_user_indices(lake, end - timedelta(days=7), end, user_ids)) < len(from_lake)
    seven_days = weekly_run.config.interactions.model_copy(update={"history_days": 7})
    short = replace(weekly_run, config=weekly_run.config.model_copy(update={"interactions": seven_days}))
    assert active_users(short, user_ids, n_items).tolist() == from_lake.tolist()


def test_batch_lists_for_many_users_are_written_in_bounded_memory_without_id_statistics(tmp_path) -> None:
    """40k active users x 50 items is 2M rows: as Python strings they alone would take hundreds of MB."""
    import tracemalloc

    import pyarrow.parquet as pq

    from recsys_pipeline.recommendations import recommendation_batches, write_recommendations

    n_users, n_items, dims = 40_000, 2_000, 8
    rng = np.random.default_rng(0)
    user_vectors = rng.normal(size=(n_users, dims)).astype(np.float32)
    index = ExactIndex(np.arange(n_items), rng.normal(size=(n_items, dims)).astype(np.float32))
    seen = sp.csr_matrix(
        (np.ones(n_users, np.float32), (np.arange(n_users), rng.integers(0, n_items, n_users))),
        shape=(n_users, n_items),
    )
    user_ids = np.array([f"user-{n:07d}" for n in range(n_users)], dtype=object)
    item_ids = np.array([f"item-{n:05d}" for n in range(n_items)], dtype=object)
    tracemalloc.start()
    batches = recommendation_batches(
        np.arange(n_users), user_vectors, np.ones(n_users, bool), index, seen, np.ones(n_items), 50
    )
    written = write_recommendations(tmp_path / "recs.parquet", batches, user_ids, item_ids)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert written.users_served == n_users
    table = pq.read_table(tmp_path / "recs.parquet")
    assert table.num_rows == n_users * 50 and table.column("user_id")[50].as_py() == "user-0000001"
    assert peak < 60 * 2**20, f"peak {peak / 2**20:.0f} MB"
    # Min/max statistics only where they cost little: none for the ids.
    group = pq.ParquetFile(tmp_path / "recs.parquet").metadata.row_group(0)
    with_statistics = {
        group.column(i).path_in_schema
        for i in range(group.num_columns)
        if group.column(i).statistics is not None and group.column(i).statistics.has_min_max
    }
    assert with_statistics == {"rank", "score"}


def test_a_user_whose_history_fills_the_first_search_is_searched_deeper() -> None:
    # Item scores fall with the index; user 0 has seen the 10 best, user 1 nothing.
    item_vectors = np.linspace(1.0, 0.1, 30, dtype=np.float32).reshape(-1, 1)
    seen = sp.csr_matrix((np.ones(10), (np.zeros(10, int), np.arange(10))), shape=(2, 30))
    users, ranks, items, _ = recommend_for_users(
        np.array([0, 1]),
        np.ones((2, 1), np.float32),
        np.array([True, True]),
        ExactIndex(np.arange(30), item_vectors),
        seen,
        np.ones(30),
        top_n=2,
    )
    assert list(zip(users.tolist(), items.tolist(), strict=True)) == [(0, 10), (0, 11), (1, 0), (1, 1)]
    assert ranks.tolist() == [1, 2, 1, 2]


def test_carried_lists_are_copied_as_stored_and_counted_as_served(tmp_path) -> None:
    """A night copies the lists of users it did not re-solve from its parent's file, row for row, and
    counts them (and their items) as served alongside the lists it computed."""
    import pyarrow.parquet as pq

    from recsys_pipeline.recommendations import carried_lists, write_recommendations

    user_ids = np.array(["u0", "u1", "u2", "u3"], dtype=object)
    item_ids = np.array(["i0", "i1", "i2", "i3", "i4"], dtype=object)
    parent = tmp_path / "parent.parquet"
    rows = [
        (user, rank, item)
        for user, items in (("u1", "i3 i0"), ("u2", "i4 i1"), ("u3", "i2"))
        for rank, item in enumerate(items.split(), 1)
    ]
    write_recommendations(
        parent,
        [
            (
                np.array([user_ids.tolist().index(u) for u, _, _ in rows]),
                np.array([r for _, r, _ in rows], np.int32),
                np.array([item_ids.tolist().index(i) for _, _, i in rows]),
                np.arange(len(rows), dtype=np.float32),
            )
        ],
        user_ids,
        item_ids,
    )
    computed = (np.array([0]), np.array([1], np.int32), np.array([1]), np.array([0.5], np.float32))
    written = write_recommendations(
        tmp_path / "night.parquet",
        [computed],
        user_ids,
        item_ids,
        carried_lists(parent, user_ids[[1, 3]], batch_rows=2),
    )
    table = pq.read_table(tmp_path / "night.parquet").to_pylist()
    assert [(row["user_id"], row["rank"], row["item_id"]) for row in table] == [
        ("u0", 1, "i1"),
        ("u1", 1, "i3"),
        ("u1", 2, "i0"),
        ("u3", 1, "i2"),
    ]
    assert [row["score"] for row in table] == [0.5, 0.0, 1.0, 4.0]
    assert written.users_served == 3
    assert written.items.tolist() == [True, True, True, True, False]


def test_batches_are_made_side_by_side_ahead_handed_out_in_order_and_a_failure_surfaces() -> None:
    started: list[int] = []
    makers: set[int] = set()

    def make(number: int) -> tuple[np.ndarray, ...]:
        started.append(number)
        makers.add(threading.get_ident())
        time.sleep(0.02 * (3 - number % 3))  # later batches are ready before earlier ones
        if number == 6:
            raise RuntimeError("lost the index")
        return (np.array([number]),) * 4

    got = made_ahead(make, range(10), workers=2)
    first = next(got)
    time.sleep(0.3)
    # While the first batch is in hand, four more are made or being made, and no further.
    assert first[0].tolist() == [0] and sorted(started) == [0, 1, 2, 3, 4]
    rest = []
    with pytest.raises(RuntimeError, match="lost the index"):
        for batch in got:
            rest.append(int(batch[0][0]))
    assert rest == [1, 2, 3, 4, 5]
    assert len(makers) == 2 and threading.get_ident() not in makers


def test_a_list_split_between_batches_is_carried_whole_and_runs_are_found_wherever_they_start(
    tmp_path,
) -> None:
    """Lists are looked up by their first row: a list the batch cuts in two is kept (or dropped)
    whole, and a user whose rows come back later starts a run of their own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_pipeline.recommendations import SCHEMA, carried_lists, list_starts

    assert list_starts(pa.array(["a", "a", "b", "a"])).tolist() == [0, 2, 3]
    assert list_starts(pa.chunked_array([["a"], ["a", "b"]])).tolist() == [0, 2]
    assert list_starts(pa.array([], pa.string())).tolist() == []
    users = ["u1", "u1", "u2", "u2", "u2", "u3"]
    parent = tmp_path / "parent.parquet"
    pq.write_table(
        pa.table(
            [users, pa.array([1, 2, 1, 2, 3, 1], pa.int32()), ["i0"] * 6, pa.array([0.0] * 6, pa.float32())],
            schema=SCHEMA,
        ),
        parent,
    )
    carried = pa.concat_tables(carried_lists(parent, np.array(["u2"], dtype=object), batch_rows=4))
    assert carried.column("user_id").to_pylist() == ["u2"] * 3
    assert carried.column("rank").to_pylist() == [1, 2, 3]
