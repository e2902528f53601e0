"""Build the run's confidence matrices, holdout and ID maps from the lake (Spark)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time
from functools import cache, partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, DataFrameWriter, SparkSession
from pyspark.sql import functions as F

from recsys_pipeline.artifacts import SIDES, InteractionsFiles, Side
from recsys_pipeline.config import InteractionsConfig
from recsys_pipeline.content import ITEM_ID
from recsys_pipeline.events import (
    count_lake_events,
    history_window,
    lake_partitions_between,
    lake_signature,
    read_lake,
)
from recsys_pipeline.files import atomic_dir, publish_snapshot, recover_pointer, write_json
from recsys_pipeline.interactions import (
    INDEX_PAIR,
    EmptyInteractionsError,
    IdMaps,
    InputFingerprint,
    PairCounts,
    carried_pairs,
    check_holdout_size,
    check_zero_confidence_share,
    driver_input_fingerprint,
    driver_pair_confidences,
    entity_activity,
    evaluable_users,
    extend_id_map,
    extend_id_map_on_driver,
    fingerprint_sums,
    history_columns,
    history_settings_hash,
    holdout_cut,
    indexed_events,
    input_fingerprint,
    matrix_columns,
    merged_pairs,
    pair_confidences,
    read_id_map_frame,
    recent_indices,
    supported,
    unmapped_ids,
    window_ids,
    write_history,
    write_history_matrices,
    write_merged_history,
)
from recsys_pipeline.runs import RunContext, parse_instant
from recsys_pipeline.sets import distinct
from recsys_pipeline.spark import label_actions
from recsys_pipeline.stages.content import ITEMS_FILE
from recsys_pipeline.tables import PAIR_FILE_COMPRESSION, count_rows, distinct_users, write_indices

log = logging.getLogger(__name__)

# Below this share of the events' items found in the metadata, the metadata is not this catalogue's.
MIN_DESCRIBED_SHARE = 0.5


def run_interactions(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """:func:`build_interactions` holding the state lock: it reads the lake and advances the shared
    ID maps, which no other run may change meanwhile."""
    with run.layout.lock():
        return build_interactions(spark, run)


def build_interactions(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Read the history from the lake, extend the ID maps, write train/holdout matrices.

    The holdout follows ``interactions.holdout``; a refresh run holds nothing out: its model is the
    champion's, folded over the whole history. A full run whose holdout has fewer users to evaluate
    than ``evaluation.min_users`` fails here, before anything is trained on it. ``recent/`` lists the
    users and items with events in the run's own interval.
    """
    config = run.config.interactions
    window_start, window_end = history_window(run)
    history = carried_history(run)
    start = history.as_of if history else window_start
    # Read by Spark only where Spark works on them: a night's events need no Spark session at all.
    lake_events = cache(partial(read_lake, spark, run.layout.events_lake, start, window_end))
    partitions = lake_partitions_between(run.layout.events_lake, start, window_end)
    map_dir = run.layout.id_maps
    for side in SIDES:
        recover_pointer(map_dir / side)
    users_table = driver_user_map(run, start, window_end)
    driver_maps: dict[Side, pa.Table | None] = {
        "users": users_table,
        "items": driver_item_map(run, start, window_end),
    }
    spark_maps: dict[Side, DataFrame] = {}
    cached: list[DataFrame] = []
    read_sums: DataFrame | None = None
    if driver_maps["items"] is None:
        # Items are few enough to group every event by: that pass also sums the input fingerprint.
        read_sums = entity_activity(lake_events(), "item_id", run.interval_start, *fingerprint_sums()).cache()
        # A stored map's size comes from its file footers: no Spark job.
        spark_maps["items"] = extend_id_map(
            read_id_map_frame(spark, map_dir / "items"),
            catalogue_ids(spark, run, read_sums),
            stored_size(map_dir / "items"),
        ).cache()
        cached += [read_sums, spark_maps["items"]]
        label_actions(spark, "interactions: item activity and the input fingerprint")
    elif (
        count_lake_events(run.layout.events_lake, start, window_end) > run.config.spark.small_input_max_events
    ):
        read_sums = lake_events().agg(*fingerprint_sums())
        label_actions(spark, "interactions: the input fingerprint")
    out = run.artifacts.interactions
    try:
        if read_sums is None:
            read = driver_input_fingerprint(partitions, start, window_end)
        else:
            read = input_fingerprint(read_sums)
        fingerprint = read + history.fingerprint if history else read
        train_counts = PairCounts("train")
        train_pairs: DataFrame | None
        holdout_pairs: DataFrame | None
        all_pairs: DataFrame | DriverPairs
        every_pair_written = run.mode == "refresh" or config.holdout.strategy == "per_user_last"
        with atomic_dir(out.root) as staging:
            written = InteractionsFiles(staging)
            for side in SIDES:
                table = driver_maps[side]
                if table is not None:
                    write_id_map(table, written.map_dir(side))
            if (
                every_pair_written
                and users_table is not None
                and read.events <= run.config.spark.driver_max_events
            ):
                # The pairs are the written history, the matrices read from it (only a refresh or a
                # per-user holdout carries a history): few enough events (a night's, a week's, a first
                # window's) are aggregated on the driver, and merged into a carried history as it is
                # written, without Spark indexing or shuffling them, or reading the history.
                train_pairs, holdout_pairs = None, None
                all_pairs = DriverPairs(history.path if history else None, start, users_table)
            else:
                for side, table in driver_maps.items():
                    if table is not None:
                        # Read back from the map the run writes: a DataFrame made from the driver's table
                        # held its rows as JVM objects in the driver's heap, and a 100M-event weekly's
                        # 2.5M users ran its 4 GB heap into garbage collection for good.
                        spark_maps[side] = spark.read.parquet(str(written.map_dir(side)))
                if users_table is None:
                    spark_maps["users"] = spark_user_map(spark, map_dir / "users", lake_events())
                cached.append(spark_maps["users"])
                # Ids become dense indices before the aggregation: integer pairs shuffle and hash far
                # cheaper than strings.
                label_actions(spark, "interactions: the ID maps")
                maps = IdMaps(users=spark_maps["users"], items=spark_maps["items"])
                indexed = indexed_events(lake_events(), maps, run.config.spark.broadcast_max_rows)
                train_pairs, holdout_pairs, all_pairs = split(
                    lake_events(), indexed, run, window_end, train_counts, cached, history
                )
            for side in SIDES:
                if driver_maps[side] is None:
                    label_actions(spark, f"interactions: write the {side} map")
                    spark_maps[side].orderBy("idx").coalesce(1).write.parquet(str(written.map_dir(side)))
            if isinstance(all_pairs, DriverPairs):
                since = driver_pair_confidences(
                    partitions,
                    all_pairs.start,
                    window_end,
                    (all_pairs.users, ds.dataset(str(written.map_dir("items")), format="parquet").to_table()),
                    config,
                    scratch=staging,
                )
                if all_pairs.history is None:
                    write_history(since, written.history_dir)
                else:
                    write_merged_history(
                        pa.concat_tables(since),
                        all_pairs.history,
                        config,
                        window_end - all_pairs.start,
                        written.history_dir,
                    )
            else:
                label_actions(spark, "interactions: write the pair history")
                pair_writer(history_columns(all_pairs)).parquet(str(written.history_dir))
            write_recent(written, run.interval_start)
            if train_pairs is None:
                # The matrices are the written history's: each user's last pairs held out (a weekly).
                dropped = write_history_matrices(
                    written.history_dir,
                    config,
                    written.matrix_shape(),
                    written.train_dir,
                    written.holdout_dir,
                    last_n=None if run.mode == "refresh" else config.holdout.last_n,
                )
            else:
                label_actions(spark, "interactions: write the training matrix")
                pair_writer(matrix_columns(train_pairs)).parquet(str(written.train_dir))
                dropped = train_counts.dropped(count_rows(written.train_dir))
            train_rows = count_rows(written.train_dir)
            written.write_train_csr()
            check_zero_confidence_share(dropped, config.max_zero_confidence_share)
            if train_rows == 0:
                raise EmptyInteractionsError(
                    f"no interactions left to train on in the window {window_start.isoformat()} to "
                    f"{window_end.isoformat()} after the holdout: check the source, the window, the "
                    "event weights and interactions.holdout"
                )
            evaluable = 0
            if holdout_pairs is not None:
                label_actions(spark, "interactions: write the holdout")
                pair_writer(matrix_columns(holdout_pairs)).parquet(str(written.holdout_dir))
                label_actions(spark, "interactions: count evaluable holdout users")
                evaluable = evaluable_users(
                    spark.read.parquet(str(written.holdout_dir)),
                    spark.read.parquet(str(written.train_dir)),
                    broadcast=count_rows(written.holdout_dir) <= run.config.spark.broadcast_max_rows,
                )
            elif run.mode != "refresh":
                # Each pair went to one side: every holdout user has an item they did not train on.
                evaluable = distinct_users(written.holdout_dir)
            if run.mode != "refresh":
                check_holdout_size(evaluable, run.config.evaluation.min_users, config.holdout)
            written.write_fingerprint(str(fingerprint))
    finally:
        for frame in cached:
            frame.unpersist()
    # The shared maps advance only after this run's outputs are safely in place, each as a snapshot
    # swapped in whole: a crash never leaves the state without maps (the next run would number every
    # id from 0 and the champion's vectors would land on other users and items).
    for side in SIDES:
        publish_snapshot(map_dir / side, partial(shutil.copytree, out.map_dir(side)))
    record_history(run, fingerprint)

    holdout = out.holdout_triples()
    users, items = out.matrix_shape()
    metrics = {
        "users": float(users),
        "items": float(items),
        "train_interactions": float(count_rows(out.train_dir)),
        "holdout_interactions": float(holdout.nnz),
        "holdout_users": float(len(distinct(holdout.user_idx))),
        "holdout_users_evaluable": float(evaluable),
        "window_events": float(fingerprint.events),
        "history_carried": float(history is not None),
        "pairs_aggregated_on_driver": float(isinstance(all_pairs, DriverPairs)),
        **dropped,
    }
    run.artifacts.write_metrics("interactions", metrics)
    return metrics


def write_recent(written: InteractionsFiles, interval_start: datetime) -> None:
    """The users and items with events in the run's interval, by index: those whose latest event
    with some pair (the written history's ``event_ts``) falls in it, as the history ends where the
    interval does. Read so from a few integer columns, rather than from the interval's events by
    their string ids joined to the maps (3.6 s of a 20M-event weekly's users)."""
    recent = recent_indices(written.history_dir, interval_start, written.matrix_shape())
    for side, indices in zip(SIDES, recent, strict=True):
        write_indices(written.recent_dir(side), indices)


def driver_user_map(run: RunContext, start: datetime, end: datetime) -> pa.Table | None:
    """The users' ID map extended by the events with start <= event_ts < end, found by Arrow on the
    driver (:func:`extend_id_map_on_driver`), or None where it would hold more than
    ``spark.broadcast_max_rows`` ids (Spark then extends it)."""
    return driver_id_map(run, "users", "user_id", start, end)


def driver_item_map(run: RunContext, start: datetime, end: datetime) -> pa.Table | None:
    """The items' ID map extended on the driver as :func:`catalogue_ids` extends it with Spark: by the
    items of the events with start <= event_ts < end and, where it describes them, every item of the
    content metadata; or None where it would hold more than ``spark.broadcast_max_rows`` ids."""

    def with_described(ids: pa.Array) -> pa.Array:
        items_file = content_metadata(run)
        if items_file is None:
            return ids
        described = pq.read_table(items_file, columns=[ITEM_ID]).column(ITEM_ID).cast(pa.string())
        if not describes_catalogue(int(pc.sum(pc.is_in(ids, value_set=described)).as_py() or 0), len(ids)):
            return ids
        return pc.unique(pa.chunked_array([ids, *described.chunks], pa.string()))

    return driver_id_map(run, "items", "item_id", start, end, with_described)


def driver_id_map(
    run: RunContext,
    side: Side,
    column: str,
    start: datetime,
    end: datetime,
    catalogue: Callable[[pa.Array], pa.Array] | None = None,
) -> pa.Table | None:
    """The shared ID map of ``side`` extended on the driver by the ids of ``column`` in the events with
    start <= event_ts < end (or by the ``catalogue`` made of them), or None where it would hold more
    than ``spark.broadcast_max_rows`` ids."""
    stored = run.layout.id_maps / side
    max_rows = run.config.spark.broadcast_max_rows
    if stored_size(stored) > max_rows:
        return None
    partitions = lake_partitions_between(run.layout.events_lake, start, end)
    ids = window_ids(partitions, column, start, end, max_rows)
    if ids is None:
        return None
    existing = ds.dataset(str(stored), format="parquet").to_table() if stored.is_dir() else None
    return extend_id_map_on_driver(existing, ids if catalogue is None else catalogue(ids), max_rows)


def spark_user_map(spark: SparkSession, stored: Path, events: DataFrame) -> DataFrame:
    """The users' ID map extended by Spark: only the ids the stored map lacks are grouped (in steady
    state almost every id is mapped already)."""
    existing = read_id_map_frame(spark, stored)
    return extend_id_map(existing, unmapped_ids(events, "user_id", existing), stored_size(stored)).cache()


def write_id_map(table: pa.Table, folder: Path) -> None:
    """An ID map as one Parquet file in ``folder``, as Spark writes one (ordered by index)."""
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")


def stored_size(map_dir: Path) -> int:
    return count_rows(map_dir) if map_dir.is_dir() else 0


def pair_writer(pairs: DataFrame) -> DataFrameWriter:
    """A writer for millions of (user, item) rows: without dictionary encoding, which would be tried
    on columns of hundreds of thousands of distinct indices for a fraction of the size saved, nor
    compression (:data:`~recsys_pipeline.tables.PAIR_FILE_COMPRESSION`)."""
    return pairs.write.option("parquet.enable.dictionary", "false").option(
        "compression", PAIR_FILE_COMPRESSION
    )


def catalogue_ids(spark: SparkSession, run: RunContext, item_activity: DataFrame) -> DataFrame:
    """Items with events, and with content enabled every item of the metadata: an item nobody has
    touched yet still gets an index, so that its content vector can place it.

    ID maps only grow, so metadata that names hardly any item of the events (another catalogue's,
    such as the bundled sample's left configured beside one's own events) adds nothing; the
    content stage then says what is wrong.
    """
    ids = item_activity.select("id")
    items_file = content_metadata(run)
    if items_file is None:
        return ids
    described = spark.read.parquet(str(items_file)).select(F.col(ITEM_ID).alias("id"))
    if not describes_catalogue(ids.join(described, "id", "left_semi").count(), ids.count()):
        return ids
    return ids.unionByName(described)


def content_metadata(run: RunContext) -> Path | None:
    """The item metadata the catalogue may take items from: with content on, once ingested."""
    items_file = run.layout.items_lake / ITEMS_FILE
    return items_file if run.config.content.enabled and items_file.is_file() else None


def describes_catalogue(matched: int, ids: int) -> bool:
    """Whether metadata naming ``matched`` of the events' ``ids`` distinct items is this catalogue's."""
    return matched >= MIN_DESCRIBED_SHARE * ids


@dataclass(frozen=True)
class DriverPairs:
    """The events the driver aggregates (:func:`driver_pair_confidences`), and the carried history
    they merge into as it is written (:func:`write_merged_history`), if any."""

    history: Path | None  # the carried history's folder
    start: datetime  # where the history ends, or the window starts: the events since are aggregated
    users: pa.Table  # the users' ID map, extended on the driver by those events


def split(
    events: DataFrame,
    indexed: DataFrame,
    run: RunContext,
    window_end: datetime,
    train_counts: PairCounts,
    cached: list[DataFrame],
    history: PairHistory | None = None,
) -> tuple[DataFrame | None, DataFrame | None, DataFrame]:
    """(training pairs, holdout pairs, every pair unfiltered) of the window's events (``indexed``: with
    their ID indices), by the run's holdout strategy; frames it persists are appended to ``cached`` for
    the caller to release.

    ``history`` holds the pairs an earlier run aggregated (``indexed`` then holds only the events
    since), for a refresh or a per-user holdout, with too many events since for the driver
    (:class:`DriverPairs`) or users too many for the driver's map.

    A refresh and a per-user holdout return no training or holdout pairs (None): those are read back
    from every pair once written (:func:`write_history_matrices`, which also picks each user's last
    pairs), rather than aggregated again or held in memory. A refresh holds nothing out: its model is
    the champion's, folded over the whole history.
    """
    config = run.config.interactions
    carried = (
        carried_pairs(events.sparkSession.read.parquet(str(history.path)), config, window_end - history.as_of)
        if history
        else None
    )
    if run.mode == "refresh" or config.holdout.strategy == "per_user_last":
        every_pair = pair_confidences(
            indexed, config, F.lit(window_end), INDEX_PAIR, last_seen=True, carried=carried
        )
        return None, None, every_pair
    holdout_only = holdout_settings(config)
    # A global cut: training and holdout pairs come from disjoint events (the holdout's days are read
    # apart, pruned by date), so neither needs the other's aggregate kept around.
    cut = holdout_cut(events, config.holdout, window_end)
    before_cut = F.col("event_ts") < F.lit(cut)
    train = pair_confidences(
        indexed.where(before_cut), config, F.lit(cut), INDEX_PAIR, last_seen=True
    ).persist()
    cached.append(train)
    after_cut = indexed.where(~before_cut)
    held = pair_confidences(after_cut, holdout_only, F.lit(window_end), INDEX_PAIR)
    trained = carried_pairs(train, config, window_end - cut)
    # The holdout's events merge with the training pairs by broadcast, where aggregating them
    # together would shuffle every training pair again.
    label_actions(events.sparkSession, "interactions: count the holdout's events")
    if events.where(~before_cut).count() <= run.config.spark.broadcast_max_rows:
        every_pair = merged_pairs(after_cut, config, F.lit(window_end), trained)
    else:
        every_pair = pair_confidences(
            after_cut, config, F.lit(window_end), INDEX_PAIR, last_seen=True, carried=trained
        )
    return (
        supported(train, config, INDEX_PAIR, train_counts),
        supported(held, holdout_only, INDEX_PAIR),
        every_pair,
    )


def holdout_settings(config: InteractionsConfig) -> InteractionsConfig:
    """The filters a holdout's pairs pass: positive and capped, with no minimum support (an item or
    user too rare to train on is still one to evaluate on)."""
    return config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1})


@dataclass(frozen=True)
class PairHistory:
    """Pair aggregates an earlier run made over every event before ``as_of``."""

    path: Path
    as_of: datetime
    fingerprint: InputFingerprint


def carried_history(run: RunContext) -> PairHistory | None:
    """The last run's pair history to carry forward, or None when the run must rebuild from every
    event: no history yet, a sliding ``history_days`` window (events leave it), a weekly holding out
    by a global cut (it aggregates the events before the cut apart), a history newer than a night's
    interval or a week's end (a replayed run), other confidence settings, or a lake whose days before
    the history's end were re-ingested since (late events, a full re-ingest, an erasure).

    A weekly with the per-user holdout carries it as a night does: each user's last pairs are
    marked over the merged pairs, as over pairs aggregated from every event (tested equal)."""
    config = run.config
    pointer = run.layout.pair_history
    per_user = config.interactions.holdout.strategy == "per_user_last"
    if config.interactions.history_days or not pointer.is_file() or not (run.mode == "refresh" or per_user):
        return None
    record = json.loads(pointer.read_text())
    as_of = parse_instant(record["as_of"])
    latest = run.interval_start if run.mode == "refresh" else run.interval_end
    if as_of > latest:
        reason = f"it ends at {as_of.isoformat()}, after {latest.isoformat()}"
    elif record["settings"] != history_settings_hash(config.interactions, config.events.min_event_time):
        reason = "the confidence settings changed since"
    elif record["lake"] != lake_signature(run.layout.events_lake, as_of.date()):
        reason = "days of the lake before its end were ingested again since"
    elif not Path(record["path"]).is_dir():
        reason = f"{record['path']} is gone"
    else:
        return PairHistory(
            Path(record["path"]),
            as_of,
            InputFingerprint.parse(record["fingerprint"]),
        )
    log.info("aggregating every event of the window: the last pair history cannot be carried (%s)", reason)
    return None


def record_history(run: RunContext, fingerprint: InputFingerprint) -> None:
    """Point the next refresh at this run's pair history. Only a history that ends at a day boundary
    (the lake is dated by day), over all events (no sliding window), and no older than the one
    recorded can be carried: a replayed older night leaves the newer history in place."""
    as_of = run.interval_end
    pointer = run.layout.pair_history
    if run.config.interactions.history_days or as_of != datetime.combine(as_of.date(), time(), tzinfo=UTC):
        return
    if pointer.is_file() and parse_instant(json.loads(pointer.read_text())["as_of"]) > as_of:
        return
    write_json(
        pointer,
        {
            "path": str(run.artifacts.interactions.history_dir),
            "as_of": as_of.isoformat(),
            "settings": history_settings_hash(run.config.interactions, run.config.events.min_event_time),
            "lake": lake_signature(run.layout.events_lake, as_of.date()),
            "fingerprint": str(fingerprint),
            "run_dir": str(run.run_dir),
        },
    )
