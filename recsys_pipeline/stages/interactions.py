"""Build the run's confidence matrices, holdout and ID maps from the lake (Spark)."""

from __future__ import annotations

import shutil
from datetime import datetime

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_pipeline.content import ITEM_ID
from recsys_pipeline.events import history_window, read_lake
from recsys_pipeline.interactions import (
    INDEX_PAIR,
    MATRIX_SCHEMA,
    EmptyInteractionsError,
    IdMaps,
    PairCounts,
    check_holdout_size,
    check_zero_confidence_share,
    entity_activity,
    evaluable_users,
    extend_id_map,
    fingerprint_sums,
    holdout_cut,
    indexed_events,
    input_fingerprint,
    mark_last_per_user,
    matrix_columns,
    pair_confidences,
    read_id_map_frame,
    supported,
    unmapped_ids,
)
from recsys_pipeline.runs import SIDES, RunContext, atomic_dir
from recsys_pipeline.stages.content import ITEMS_FILE
from recsys_pipeline.tables import count_rows

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
    events = read_lake(spark, run.layout.events_lake, window_start, window_end)
    map_dir = run.layout.id_maps
    existing_users = read_id_map_frame(spark, map_dir / "users")
    # Items are few enough to group every event by: that pass also sums the input fingerprint. Users
    # are many, so only those new since the last run and those active in this run's interval (a
    # date-pruned read) are grouped.
    item_activity = entity_activity(events, "item_id", run.interval_start, *fingerprint_sums()).cache()
    maps = IdMaps(
        users=extend_id_map(existing_users, unmapped_ids(events, "user_id", existing_users)).cache(),
        items=extend_id_map(
            read_id_map_frame(spark, map_dir / "items"), catalogue_ids(spark, run, item_activity)
        ).cache(),
    )
    recent_ids = {
        "users": read_lake(spark, run.layout.events_lake, run.interval_start, window_end)
        .select(F.col("user_id").alias("id"))
        .distinct(),
        "items": item_activity.where("recent").select("id"),
    }
    out = run.interactions_dir
    cached: list[DataFrame] = [item_activity, maps.users, maps.items]
    try:
        # Ids become dense indices before the aggregation: integer pairs shuffle and hash far cheaper than
        # strings.
        indexed = indexed_events(events, maps)
        train_counts = PairCounts("train")
        train_pairs, holdout_pairs = split(events, indexed, run, window_end, train_counts, cached)
        fingerprint = input_fingerprint(item_activity)
        with atomic_dir(out) as staging:
            for side, id_map in (("users", maps.users), ("items", maps.items)):
                id_map.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / side))
                (
                    recent_ids[side]
                    .join(id_map, "id")
                    .select("idx")
                    .coalesce(1)
                    .write.parquet(str(staging / "recent" / side))
                )
            matrix_columns(train_pairs).write.parquet(str(staging / "train"))
            train_rows = count_rows(staging / "train")
            dropped = train_counts.dropped(train_rows)
            check_zero_confidence_share(dropped, config.max_zero_confidence_share)
            if train_rows == 0:
                raise EmptyInteractionsError(
                    f"no interactions left to train on in the window {window_start.isoformat()} to "
                    f"{window_end.isoformat()} after the holdout: check the source, the window, the "
                    "event weights and interactions.holdout"
                )
            evaluable = 0
            if holdout_pairs is None:
                spark.createDataFrame([], MATRIX_SCHEMA).write.parquet(str(staging / "holdout"))
            else:
                matrix_columns(holdout_pairs).write.parquet(str(staging / "holdout"))
                evaluable = evaluable_users(
                    spark.read.parquet(str(staging / "holdout")), spark.read.parquet(str(staging / "train"))
                )
                check_holdout_size(evaluable, run.config.evaluation.min_users, config.holdout)
            (staging / "fingerprint.txt").write_text(fingerprint + "\n")
    finally:
        for frame in cached:
            frame.unpersist()
    # The shared maps advance only after this run's outputs are safely in place.
    for side in SIDES:
        with atomic_dir(map_dir / side) as staging:
            shutil.copytree(run.id_map_dir(side), staging)

    holdout = run.holdout_triples()
    users, items = run.matrix_shape()
    metrics = {
        "users": float(users),
        "items": float(items),
        "train_interactions": float(count_rows(out / "train")),
        "holdout_interactions": float(holdout.nnz),
        "holdout_users": float(len(np.unique(holdout.user_idx))),
        "holdout_users_evaluable": float(evaluable),
        "window_events": float(fingerprint.split(":")[0]),
        **dropped,
    }
    run.write_metrics("interactions", metrics)
    return metrics


def catalogue_ids(spark: SparkSession, run: RunContext, item_activity: DataFrame) -> DataFrame:
    """Items with events, and with content enabled every item of the metadata: an item nobody has
    touched yet still gets an index, so that its content vector can place it.

    ID maps only grow, so metadata that names hardly any item of the events (another catalogue's,
    such as the bundled sample's left configured beside one's own events) adds nothing; the
    content stage then says what is wrong.
    """
    ids = item_activity.select("id")
    items_file = run.layout.items_lake / ITEMS_FILE
    if not (run.config.content.enabled and items_file.is_file()):
        return ids
    described = spark.read.parquet(str(items_file)).select(F.col(ITEM_ID).alias("id"))
    matched = ids.join(described, "id", "left_semi").count()
    if matched < MIN_DESCRIBED_SHARE * ids.count():
        return ids
    return ids.unionByName(described)


def split(
    events: DataFrame,
    indexed: DataFrame,
    run: RunContext,
    window_end: datetime,
    train_counts: PairCounts,
    cached: list[DataFrame],
) -> tuple[DataFrame, DataFrame | None]:
    """(training pairs, holdout pairs) of the window's events (``indexed``: with their ID indices), by
    the run's holdout strategy; frames it persists are appended to ``cached`` for the caller to release.

    A refresh holds nothing out (None): its model is the champion's, folded over the whole history.
    """
    config = run.config.interactions
    if run.mode == "refresh":
        train = pair_confidences(indexed, config, F.lit(window_end), INDEX_PAIR).persist()
        cached.append(train)
        return supported(train, config, INDEX_PAIR, train_counts), None
    holdout_only = config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1})
    if config.holdout.strategy == "per_user_last":
        pairs = mark_last_per_user(
            pair_confidences(indexed, config, F.lit(window_end), INDEX_PAIR, last_seen=True),
            config.holdout.last_n,
        ).persist()
        cached.append(pairs)
        train = pairs.where(~F.col("held_out")).select(*INDEX_PAIR, "confidence")
        held = pairs.where("held_out").select(*INDEX_PAIR, "confidence")
        return supported(train, config, INDEX_PAIR, train_counts), supported(held, holdout_only, INDEX_PAIR)
    # A global cut: training and holdout pairs come from disjoint events (the holdout's days are read
    # apart, pruned by date), so neither needs the other's aggregate kept around.
    cut = holdout_cut(events, config.holdout, window_end)
    before_cut = F.col("event_ts") < F.lit(cut)
    train = pair_confidences(indexed.where(before_cut), config, F.lit(cut), INDEX_PAIR).persist()
    cached.append(train)
    held = pair_confidences(indexed.where(~before_cut), holdout_only, F.lit(window_end), INDEX_PAIR)
    return supported(train, config, INDEX_PAIR, train_counts), supported(held, holdout_only, INDEX_PAIR)
