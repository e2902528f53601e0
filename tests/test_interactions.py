from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from recsys_pipeline.content import ITEM_ID
from recsys_pipeline.events import LAKE_ARROW_SCHEMA, lake_partitions_between, partition_name, read_lake
from recsys_pipeline.interactions import (
    HISTORY_ARROW_SCHEMA,
    ID_MAP_ARROW_SCHEMA,
    INDEX_PAIR,
    IdMaps,
    PairCounts,
    carried_pairs,
    driver_input_fingerprint,
    driver_pair_confidences,
    entity_activity,
    extend_id_map,
    extend_id_map_on_driver,
    fingerprint_sums,
    indexed_events,
    input_fingerprint,
    pair_confidences,
    read_id_map_frame,
    recent_indices,
    supported,
    unmapped_ids,
    window_ids,
    write_history_matrices,
    write_merged_history,
)
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.content import ITEMS_FILE
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.stages.interactions import (
    catalogue_ids,
    driver_item_map,
    run_interactions,
    stored_size,
    write_id_map,
)
from recsys_pipeline.tables import read_id_map, read_matrix

AS_OF = datetime(2024, 1, 10, tzinfo=UTC)
NO_MIN_SUPPORT = {"interactions.min_item_interactions": 1, "interactions.min_user_interactions": 1}


def _events(spark, rows):
    return spark.createDataFrame(
        [
            (u, i, t, float(v) if v is not None else None, AS_OF - timedelta(days=age))
            for u, i, t, v, age in rows
        ],
        "user_id string, item_id string, event_type string, value double, event_ts timestamp",
    )


def _confidences(frame) -> dict[tuple[str, str], float]:
    return {(r.user_id, r.item_id): r.confidence for r in frame.collect()}


def test_confidence_weights_value_maps_and_cap(spark, make_config) -> None:
    config = make_config(**NO_MIN_SUPPORT).interactions
    events = _events(
        spark,
        [
            ("u1", "i1", "view", None, 1),
            ("u1", "i1", "purchase", None, 1),  # 1 + 10
            ("u2", "i1", "rating", 5, 1),
            ("u2", "i2", "rating", 1, 1),  # mapped 5->4, 1->1
            ("u3", "i3", "watch", 30, 1),  # scaled by value
            *[("u3", "i4", "purchase", None, 1 + d / 100) for d in range(20)],  # 200, capped at 100
        ],
    )
    assert _confidences(supported(pair_confidences(events, config, F.lit(AS_OF)), config)) == pytest.approx(
        {("u1", "i1"): 11.0, ("u2", "i1"): 4.0, ("u2", "i2"): 1.0, ("u3", "i3"): 30.0, ("u3", "i4"): 100.0}
    )


def test_time_decay_halves_confidence_per_half_life(spark, make_config) -> None:
    config = make_config(**NO_MIN_SUPPORT, **{"interactions.half_life_days": 2.0}).interactions
    events = _events(
        spark,
        [
            ("u1", "i1", "purchase", None, 0),
            ("u1", "i2", "purchase", None, 2),
            ("u1", "i3", "purchase", None, 4),
        ],
    )
    assert _confidences(supported(pair_confidences(events, config, F.lit(AS_OF)), config)) == pytest.approx(
        {("u1", "i1"): 10.0, ("u1", "i2"): 5.0, ("u1", "i3"): 2.5}
    )


def test_min_support_and_max_aggregation(spark, make_config) -> None:
    config = make_config(
        **{"interactions.min_item_interactions": 2, "interactions.aggregation": "max"}
    ).interactions
    events = _events(
        spark,
        [
            ("u1", "i1", "view", None, 1),
            ("u1", "i1", "purchase", None, 1),
            ("u2", "i1", "click", None, 1),
            ("u2", "i2", "view", None, 1),
        ],
    )
    assert _confidences(supported(pair_confidences(events, config, F.lit(AS_OF)), config)) == {
        ("u1", "i1"): 10.0,
        ("u2", "i1"): 2.0,
    }


def _write_source(path: Path, rows: list[tuple[str, str, str, int]]) -> Path:
    path.write_text("user,item,type,ts\n" + "".join(f"{u},{i},{t},{ts}\n" for u, i, t, ts in rows))
    return path


def _run(make_config, source: Path, end: str) -> RunContext:
    config = make_config(
        **{
            "source.path": str(source),
            "source.delimiter": ",",
            "source.header": True,
            "source.column_names": None,
            "source.mapping": {"user_id": "user", "item_id": "item", "event_type": "type", "timestamp": "ts"},
            "interactions.holdout.strategy": "days",
            "interactions.holdout.days": 1,
            "evaluation.min_users": 1,  # a handful of hand-made users: no model is judged here
            **NO_MIN_SUPPORT,
        }
    )
    end_dt = datetime.fromisoformat(end)
    return RunContext.create(config, "test", end_dt - timedelta(days=7), end_dt)


def test_id_maps_keep_old_indices_and_append_new_ids(spark, make_config, tmp_path: Path) -> None:
    day = 86_400
    t0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    first_rows = [
        ("bob", "x", "view", t0),
        ("alice", "y", "view", t0 + day),
        ("bob", "y", "click", t0 + 2 * day),
        ("alice", "x", "purchase", t0 + 5 * day + 3600),
    ]
    first = _run(make_config, _write_source(tmp_path / "a.csv", first_rows), "2024-01-07")
    run_ingest(spark, first)
    run_interactions(spark, first)
    users_before = read_id_map(first.layout.id_maps / "users")
    items_before = read_id_map(first.layout.id_maps / "items")
    assert list(users_before) == ["alice", "bob"] and list(items_before) == ["x", "y"]

    second_rows = [*first_rows, ("aaron", "w", "view", t0 + 8 * day), ("bob", "w", "view", t0 + 8 * day)]
    second = _run(make_config, _write_source(tmp_path / "b.csv", second_rows), "2024-01-10")
    run_ingest(spark, second)
    metrics = run_interactions(spark, second)
    users_after = read_id_map(second.layout.id_maps / "users")
    items_after = read_id_map(second.layout.id_maps / "items")
    # "aaron" sorts before "alice" but is new, so it goes to the end: indices never move.
    assert list(users_after) == ["alice", "bob", "aaron"]
    assert list(items_after) == ["x", "y", "w"]
    assert metrics["users"] == 3 and metrics["items"] == 3
    # The first run's snapshot is untouched by the second run.
    assert list(first.artifacts.interactions.ids("users")) == ["alice", "bob"]

    holdout = second.artifacts.interactions.holdout_triples()
    assert sorted(zip(holdout.user_idx.tolist(), holdout.item_idx.tolist(), strict=True)) == [(1, 2), (2, 2)]
    train = second.artifacts.interactions.train_triples()
    csr = train.to_csr(3, 3)
    assert (
        csr[0, 1] == pytest.approx(1.0)
        and csr[0, 0] == pytest.approx(10.0)
        and csr[1, 1] == pytest.approx(2.0)
    )
    assert np.all(csr[2].toarray() == 0)
    # Later stages start from the matrix's CSR arrays: the same matrix as its Parquet pairs.
    files = second.artifacts.interactions
    assert files.train_csr_dir.is_dir()
    assert (files.train_matrix() != read_matrix(files.train_dir).to_csr(*files.matrix_shape())).nnz == 0


def _lake_of_users(lake: Path, users_by_hour: dict[int, list[str]]) -> None:
    """A lake of one view per user and hour (hours after AS_OF)."""
    _lake_of_events(
        lake,
        [
            (user, "i", "view", None, AS_OF + timedelta(hours=hour))
            for hour, users in users_by_hour.items()
            for user in users
        ],
    )


def _lake_of_events(lake: Path, rows: list[tuple]) -> None:
    """A lake of (user, item, type, value, time) events, a file per date as ingest writes it."""
    for day in sorted({row[4].date() for row in rows}):
        folder = lake / partition_name(day)
        folder.mkdir(parents=True)
        held = [row for row in rows if row[4].date() == day]
        columns = dict(
            zip(
                ("user_id", "item_id", "event_type", "value", "event_ts"),
                zip(*held, strict=True),
                strict=True,
            )
        )
        columns |= {"ingested_at": [AS_OF] * len(held), "source": ["test"] * len(held)}
        pq.write_table(pa.table(columns, schema=LAKE_ARROW_SCHEMA), folder / "part-00000.parquet")


def test_the_driver_extends_an_id_map_as_spark_does_within_its_bound(spark, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    # Ids Spark and Arrow must order alike (by their UTF-8 bytes, not by letter: "ß" between "É" and "é"),
    # repeats, ids already mapped, and ids on the window's first and last dates but outside it.
    _lake_of_users(
        lake,
        {
            1: ["early"],
            3: ["émile", "Zoe", "bob", "alice", "bob"],
            20: ["Émile", "zed", "alice", "ß"],
            30: ["carol", "bob"],
            52: ["late"],
        },
    )
    start, end = AS_OF + timedelta(hours=2), AS_OF + timedelta(hours=52)
    existing = pa.table({"id": ["bob", "", "carol"], "idx": pa.array([0, 1, 2], pa.int32())})
    partitions = lake_partitions_between(lake, start, end)
    assert len(partitions) == 3

    def spark_map(max_rows: int) -> list[tuple[str, int]] | None:
        existing_frame = spark.createDataFrame(existing)
        ids = unmapped_ids(read_lake(spark, lake, start, end), "user_id", existing_frame)
        rows = [(row.id, row.idx) for row in extend_id_map(existing_frame, ids, 3).orderBy("idx").collect()]
        return rows if len(rows) <= max_rows else None

    def driver_map(max_rows: int, mapped: pa.Table | None = existing) -> list[tuple[str, int]] | None:
        ids = window_ids(partitions, "user_id", start, end, max_rows)
        table = None if ids is None else extend_id_map_on_driver(mapped, ids, max_rows)
        return (
            None
            if table is None
            else list(zip(table["id"].to_pylist(), table["idx"].to_pylist(), strict=True))
        )

    expected = spark_map(10)
    assert expected is not None and [user for user, _ in expected[3:]] == [
        "Zoe",
        "alice",
        "zed",
        "Émile",
        "ß",
        "émile",
    ]
    assert driver_map(10) == driver_map(9) == expected
    # Past the bound the driver leaves the map to Spark, whether the map or the window is too large.
    assert driver_map(8) is None and driver_map(2) is None
    every_user = sorted(["Zoe", "alice", "bob", "carol", "zed", "ß", "Émile", "émile"], key=str.encode)
    assert driver_map(8, mapped=None) == [(user, idx) for idx, user in enumerate(every_user)]
    assert driver_map(7, mapped=None) is None


# Metadata naming most of the window's items is the catalogue's: every item it names is mapped, those
# without events too. Metadata naming few of them (another catalogue's) adds none.
@pytest.mark.parametrize(
    ("described", "added"),
    [(["b", "c", "d", "new"], ["b", "c", "e", "new"]), (["c", "x", "y"], ["b", "c", "e"])],
    ids=["the-catalogue", "another-catalogue"],
)
def test_the_driver_extends_the_items_map_with_the_metadata_as_spark_does(
    spark, make_config, tmp_path: Path, described: list[str], added: list[str]
) -> None:
    config = make_config()
    assert config.content.enabled
    start, end = AS_OF, AS_OF + timedelta(days=2)
    run = RunContext.create(config, "recsys_weekly", start, end, "manual__items")
    # Items in the window (one already mapped, one twice), and one outside it.
    times = [AS_OF + timedelta(hours=hours) for hours in (1, 5, 20, 30, 40, 50)]
    items = ["b", "c", "d", "e", "b", "z"]
    _lake_of_events(run.layout.events_lake, [("u", item, "view", None, t) for item, t in zip(items, times)])
    run.layout.items_lake.mkdir(parents=True)
    pq.write_table(pa.table({ITEM_ID: described}), run.layout.items_lake / ITEMS_FILE)
    stored = run.layout.id_maps / "items"
    write_id_map(pa.table({"id": ["d", "a"], "idx": pa.array([0, 1], pa.int32())}), stored)

    activity = entity_activity(read_lake(spark, run.layout.events_lake, start, end), "item_id", start)
    expected = extend_id_map(
        read_id_map_frame(spark, stored), catalogue_ids(spark, run, activity), stored_size(stored)
    ).orderBy("idx")
    table = driver_item_map(run, start, end)

    assert table is not None
    assert list(zip(table["id"].to_pylist(), table["idx"].to_pylist(), strict=True)) == [
        (row.id, row.idx) for row in expected.collect()
    ]
    assert table["id"].to_pylist() == ["d", "a", *added]


# Each event's weight is computed apart from how the pairs aggregate: one case of each covers both.
# A batch of 100 events: the dates are read in several batches, each pair's events spread over them,
# and aggregated in as many parts by user.
@pytest.mark.parametrize(
    ("aggregation", "half_life_days", "batch_events"), [("sum", None, 1 << 22), ("max", 3.0, 100)]
)
def test_the_driver_aggregates_a_windows_pairs_as_spark_does(
    spark, make_config, tmp_path: Path, aggregation: str, half_life_days: float | None, batch_events: int
) -> None:
    weights = {
        "view": {"weight": 1},
        "click": {"weight": 2},
        "add_to_cart": {"weight": 3},
        "purchase": {"weight": 10},
        "watch": {"weight": 1, "scale_by_value": True},
        "rating": {"weight": 2, "value_map": {2: 1, 4: 3, 5: 4}},
    }
    config = make_config(
        **{
            "interactions.aggregation": aggregation,
            "interactions.half_life_days": half_life_days,
            "interactions.event_weights": weights,
        }
    ).interactions
    rng = np.random.default_rng(5)
    # Every kind of weight (plain, scaled by value, a value map between, on and beyond its points,
    # no value), a type without a weight, times to the microsecond over four dates, some of them
    # outside the window on its first and last dates.
    kinds = [
        ("view", None),
        ("purchase", None),
        ("watch", 30.0),
        ("watch", None),
        ("rating", 3.5),
        ("rating", 4.0),
        ("rating", 0.5),
        ("rating", 9.0),
        ("rating", None),
        ("share", None),
    ]
    rows = [
        (
            f"u{rng.integers(40)}",
            f"i{rng.integers(25)}",
            *kinds[rng.integers(len(kinds))],
            AS_OF + timedelta(microseconds=int(offset)),
        )
        for offset in rng.integers(0, 4 * 86_400_000_000, 800)
    ]
    lake = tmp_path / "lake"
    _lake_of_events(lake, rows)
    start, end = AS_OF + timedelta(hours=5), AS_OF + timedelta(days=3, hours=7)
    # Indices in no order of the ids, beyond the map's length: each id's own must be found, and the
    # last part of users takes every index from its first on.
    users, items = (
        pa.table(
            {"id": ids, "idx": pa.array(rng.permutation(len(ids)) + offset, pa.int32())},
            schema=ID_MAP_ARROW_SCHEMA,
        )
        for ids, offset in (([f"u{n}" for n in range(40)], 2), ([f"i{n}" for n in range(25)], 3))
    )
    partitions = lake_partitions_between(lake, start, end)
    assert len(partitions) == 4

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    parts = list(
        driver_pair_confidences(partitions, start, end, (users, items), config, scratch, batch_events)
    )
    assert len(parts) == (1 if batch_events > 800 else 8)
    assert not any(scratch.iterdir())  # the parts' file, if written, is gone
    driver = pa.concat_tables(parts)
    maps = IdMaps(users=spark.createDataFrame(users), items=spark.createDataFrame(items))
    expected = pair_confidences(
        indexed_events(read_lake(spark, lake, start, end), maps, 100),
        config,
        F.lit(end),
        INDEX_PAIR,
        last_seen=True,
    ).toArrow()
    assert driver.schema == HISTORY_ARROW_SCHEMA
    found, wanted = (
        {(row["user_idx"], row["item_idx"]): row for row in table.to_pylist()} for table in (driver, expected)
    )
    assert 200 < len(found) == len(wanted) == driver.num_rows < len([r for r in rows if start <= r[4] < end])
    assert {pair: row["event_ts"] for pair, row in found.items()} == {
        pair: row["event_ts"] for pair, row in wanted.items()
    }
    confidences = {pair: row["confidence"] for pair, row in found.items()}
    assert confidences == pytest.approx({pair: row["confidence"] for pair, row in wanted.items()}, rel=1e-12)
    assert 0.0 in confidences.values()


def _maps(spark) -> IdMaps:
    return IdMaps(
        users=spark.createDataFrame([("u2", 0), ("u1", 1), ("u9", 2)], "id string, idx int"),
        items=spark.createDataFrame([("i2", 5), ("i1", 3), ("i7", 4)], "id string, idx int"),
    )


_INDEXED_EVENTS = [
    ("u1", "i1", "view", None, 1),
    ("u2", "i2", "view", None, 1),
    ("u2", "i1", "view", None, 2),
]


@pytest.mark.parametrize("id_hash", [F.xxhash64, lambda _: F.lit(7)], ids=["hashed", "colliding"])
@pytest.mark.parametrize("broadcast_max_rows", [3, 2], ids=["broadcast", "shuffled"])
def test_events_get_the_indices_of_their_own_ids(spark, id_hash, broadcast_max_rows) -> None:
    """A hash that collides for every id must still give each event its own id's index."""
    events = _events(spark, _INDEXED_EVENTS)
    indexed = indexed_events(events, _maps(spark), broadcast_max_rows, id_hash)
    assert sorted(
        tuple(row) for row in indexed.select("user_id", "user_idx", "item_id", "item_idx").collect()
    ) == [
        ("u1", 1, "i1", 3),
        ("u2", 0, "i1", 3),
        ("u2", 0, "i2", 5),
    ]


@pytest.mark.parametrize(("broadcast_max_rows", "join"), [(3, "BroadcastHashJoin"), (2, "SortMergeJoin")])
def test_maps_up_to_the_broadcast_bound_are_broadcast_and_never_the_events(
    spark, tmp_path, broadcast_max_rows, join
) -> None:
    # Left to its size estimates, Spark would broadcast the events: their file is small, and it
    # cannot size the maps.
    _events(spark, _INDEXED_EVENTS).write.parquet(str(tmp_path / "events"))
    events = spark.read.parquet(str(tmp_path / "events"))
    indexed = indexed_events(events, _maps(spark), broadcast_max_rows)
    physical = indexed._jdf.queryExecution().executedPlan().toString()
    assert physical.count(join) == 2 and "BuildLeft" not in physical, physical


def _random_history(path: Path, seed: int = 7) -> tuple[int, int]:
    """A pair history (``HISTORY_SCHEMA``) of random pairs, some of zero confidence, some above the
    cap and many sharing their user's latest time, written as Arrow writes one; returns its shape."""
    rng = np.random.default_rng(seed)
    users, items = 60, 40
    # The others about 15 pairs each; the last two users 3 and 2 positive ones: a holdout of the last
    # 3 pairs would leave them nothing to train on.
    few = [58 * items, 58 * items + 1, 58 * items + 2, 59 * items, 59 * items + 1]
    keys = np.concatenate([rng.choice((users - 2) * items, size=900, replace=False), few])
    confidence = rng.choice([0.0, 1.0, 3.5, 250.0], size=len(keys), p=[0.15, 0.5, 0.25, 0.1])
    confidence[-len(few) :] = 1.0
    columns = {
        "user_idx": pa.array(keys // items, pa.int32()),
        "item_idx": pa.array(keys % items, pa.int32()),
        "confidence": pa.array(confidence * rng.uniform(0.5, 1.5, len(keys))),
        "event_ts": pa.array([AS_OF - timedelta(hours=int(h)) for h in rng.integers(0, 12, len(keys))]),
    }
    path.mkdir()
    pq.write_table(pa.table(columns), path / "part-00000.parquet")
    return users, items


def _latest_per_user(history: Path, last_n: int) -> set[tuple[int, int]]:
    """Each user's last_n latest positive pairs, ties to the higher item, for users with more: as
    the per-user holdout promises, by sorting each user's pairs."""
    by_user: dict[int, list[dict]] = {}
    for row in pq.read_table(history).to_pylist():
        if row["confidence"] > 0:
            by_user.setdefault(row["user_idx"], []).append(row)
    return {
        (user, row["item_idx"])
        for user, rows in by_user.items()
        if len(rows) > last_n
        for row in sorted(rows, key=lambda row: (row["event_ts"], row["item_idx"]), reverse=True)[:last_n]
    }


# Supports that drop some pairs and keep most, with or without three pairs per user held out, and
# the default minimum of one pair per user, which the users' pass is skipped for.
@pytest.mark.parametrize(
    ("last_n", "min_item_interactions", "min_user_interactions"),
    [(3, 13, 9), (None, 17, 9), (None, 17, 1)],
    ids=["last-3-held-out", "none-held-out", "any-user"],
)
def test_the_matrices_of_a_written_history_are_the_pairs_spark_keeps_with_the_same_counts(
    spark,
    make_config,
    tmp_path: Path,
    last_n: int | None,
    min_item_interactions: int,
    min_user_interactions: int,
) -> None:
    config = make_config(
        **{
            "interactions.min_item_interactions": min_item_interactions,
            "interactions.min_user_interactions": min_user_interactions,
        }
    ).interactions
    history = tmp_path / "history"
    shape = _random_history(history)
    dropped = write_history_matrices(
        history, config, shape, tmp_path / "train", tmp_path / "holdout", last_n, batch_rows=100
    )

    held = _latest_per_user(history, last_n) if last_n else set()
    table = pq.read_table(history)
    rows = table.to_pylist()
    trains = spark.createDataFrame(
        table.filter(pa.array([(row["user_idx"], row["item_idx"]) not in held for row in rows]))
    )
    counts = PairCounts("contract")
    expected_train = _indexed_confidences(supported(trains, config, INDEX_PAIR, counts))
    expected_holdout = {
        (row["user_idx"], row["item_idx"]): min(row["confidence"], config.max_confidence)
        for row in rows
        if (row["user_idx"], row["item_idx"]) in held
    }
    train, holdout = read_matrix(tmp_path / "train"), read_matrix(tmp_path / "holdout")

    assert _triples(train) == pytest.approx(expected_train)
    assert _triples(holdout) == pytest.approx(expected_holdout)
    assert dropped == counts.dropped(train.nnz)
    # Every filter that can drop a pair dropped some, and a capped pair is kept: the data exercises
    # each of them.
    by_user = dropped.pop("dropped_pairs_min_user_support")
    assert (by_user > 0) == (min_user_interactions > 1)
    assert min(dropped.values()) > 0 and max(train.confidence) == config.max_confidence
    # Users held out less than everything, and ties in time were broken: the choice is tested.
    if last_n:
        assert 0 < len({user for user, _ in held}) < shape[0]
        latest = {}
        for row in rows:
            if row["confidence"] > 0:
                latest.setdefault((row["user_idx"], row["event_ts"]), []).append(row["item_idx"])
        assert any(len(items) > 1 for items in latest.values())


def test_the_users_and_items_of_a_histories_latest_pairs_are_recent(tmp_path: Path) -> None:
    history = tmp_path / "history"
    shape = _random_history(history)
    since = AS_OF - timedelta(hours=2)
    users, items = recent_indices(history, since, shape)

    table = pq.read_table(history)
    latest = np.asarray([ts >= since for ts in table.column("event_ts").to_pylist()])
    assert 0 < latest.sum() < len(latest)
    for found, column in ((users, "user_idx"), (items, "item_idx")):
        np.testing.assert_array_equal(found, np.unique(table.column(column).to_numpy()[latest]))


@pytest.mark.parametrize("aggregation", ["sum", "max"])
def test_a_nights_pairs_merged_into_a_written_history_are_what_spark_aggregates(
    spark, make_config, tmp_path: Path, aggregation: str
) -> None:
    config = make_config(
        **{"interactions.half_life_days": 3.0, "interactions.aggregation": aggregation}
    ).interactions
    history = tmp_path / "history"
    _random_history(history)
    elapsed = timedelta(days=1)
    as_of = AS_OF + elapsed
    rng = np.random.default_rng(3)
    # The night's events: on pairs the history holds, and on new ones; users 50-59 of the history
    # have none (beyond every user of the night's).
    night_events = spark.createDataFrame(
        [
            (int(u), int(i), str(t), as_of - timedelta(hours=int(h)))
            for u, i, t, h in zip(
                rng.integers(0, 50, 400),
                rng.integers(0, 40, 400),
                rng.choice(["view", "click", "purchase"], 400),
                rng.integers(1, 24, 400),
                strict=True,
            )
        ],
        "user_idx int, item_idx int, event_type string, event_ts timestamp",
    ).withColumn("value", F.lit(None).cast("double"))
    night = pair_confidences(night_events, config, F.lit(as_of), INDEX_PAIR, last_seen=True)
    write_merged_history(night.toArrow(), history, config, elapsed, tmp_path / "merged", batch_rows=100)

    carried = carried_pairs(spark.read.parquet(str(history)), config, elapsed)
    expected = pair_confidences(
        night_events, config, F.lit(as_of), INDEX_PAIR, last_seen=True, carried=carried
    )
    merged, expected_pairs = pq.read_table(tmp_path / "merged"), expected.toArrow()
    assert merged.schema.names == ["user_idx", "item_idx", "confidence", "event_ts"]
    assert merged.num_rows == expected_pairs.num_rows > 200
    found, wanted = (
        {(row["user_idx"], row["item_idx"]): row for row in table.to_pylist()}
        for table in (merged, expected_pairs)
    )
    assert {pair: row["event_ts"] for pair, row in found.items()} == {
        pair: row["event_ts"] for pair, row in wanted.items()
    }
    assert {pair: row["confidence"] for pair, row in found.items()} == pytest.approx(
        {pair: row["confidence"] for pair, row in wanted.items()}
    )


def _indexed_confidences(frame) -> dict[tuple[int, int], float]:
    return {(r.user_idx, r.item_idx): r.confidence for r in frame.collect()}


def _triples(triples) -> dict[tuple[int, int], float]:
    return {
        (int(u), int(i)): float(c)
        for u, i, c in zip(triples.user_idx, triples.item_idx, triples.confidence, strict=True)
    }


def test_the_drivers_input_fingerprint_is_sparks(spark, weekly_run) -> None:
    """A carried history's fingerprint adds up whichever computed each part: the same sums by Arrow."""
    lake = weekly_run.layout.events_lake
    windows = [
        (datetime(1997, 9, 1, tzinfo=UTC), datetime(1998, 5, 1, tzinfo=UTC)),
        (datetime(1998, 4, 16, 6, tzinfo=UTC), datetime(1998, 4, 23, tzinfo=UTC)),
    ]
    for start, end in windows:
        by_spark = input_fingerprint(read_lake(spark, lake, start, end).agg(*fingerprint_sums()))
        assert driver_input_fingerprint(lake_partitions_between(lake, start, end), start, end) == by_spark
        assert by_spark.events > 0
