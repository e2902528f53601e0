"""Build the run's confidence matrices, holdout and ID maps from the lake (Spark)."""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys_pipeline.events import history_window, read_lake
from recsys_pipeline.interactions import (
    INDEX_PAIR,
    EmptyInteractionsError,
    IdMaps,
    PairCounts,
    aggregate,
    check_zero_confidence_share,
    entity_activity,
    extend_id_map,
    fingerprint_sums,
    indexed_events,
    input_fingerprint,
    matrix_columns,
    read_id_map_frame,
)
from recsys_pipeline.runs import SIDES, RunContext, atomic_dir
from recsys_pipeline.tables import count_rows


def run_interactions(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """:func:`build_interactions` holding the state lock: it reads the lake and advances the shared
    ID maps, which no other run may change meanwhile."""
    with run.layout.lock():
        return build_interactions(spark, run)


def build_interactions(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Read the history from the lake, extend the ID maps, write train/holdout matrices.

    A refresh run holds nothing out: its model is the champion's, folded over the whole history.
    ``recent/`` lists the users and items with events in the run's own interval.
    """
    config = run.config.interactions
    window_start, window_end = history_window(run)
    holdout_days = 0 if run.mode == "refresh" else config.holdout_days
    holdout_start = window_end - timedelta(days=holdout_days)
    events = read_lake(spark, run.layout.events_lake, window_start, window_end)
    # The items' pass (the one with fewer keys) also sums the input fingerprint.
    activity = {
        "users": entity_activity(events, "user_id", run.interval_start).cache(),
        "items": entity_activity(events, "item_id", run.interval_start, *fingerprint_sums()).cache(),
    }
    map_dir = run.layout.id_maps
    maps = IdMaps(
        users=extend_id_map(
            read_id_map_frame(spark, map_dir / "users"), activity["users"].select("id")
        ).cache(),
        items=extend_id_map(
            read_id_map_frame(spark, map_dir / "items"), activity["items"].select("id")
        ).cache(),
    )
    out = run.interactions_dir
    try:
        # Ids become dense indices before the aggregation: integer pairs shuffle and hash far cheaper than
        # strings. Training and holdout pairs come from disjoint events (the holdout's few days are read
        # apart, pruned by date), so neither needs the other's aggregate kept around.
        indexed = indexed_events(events, maps)
        train_counts = PairCounts("train")
        train_pairs = aggregate(
            indexed.where(F.col("event_ts") < F.lit(holdout_start)),
            config,
            F.lit(holdout_start),
            INDEX_PAIR,
            train_counts,
        )
        holdout_pairs = aggregate(
            indexed.where(F.col("event_ts") >= F.lit(holdout_start)),
            config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1}),
            F.lit(window_end),
            INDEX_PAIR,
        )
        fingerprint = input_fingerprint(activity["items"])
        with atomic_dir(out) as staging:
            for side, id_map in (("users", maps.users), ("items", maps.items)):
                id_map.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / side))
                (
                    activity[side]
                    .where("recent")
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
                    f"no interactions before {holdout_start.isoformat()} in the window starting "
                    f"{window_start.isoformat()}: check the source, the window and the event weights"
                )
            matrix_columns(holdout_pairs).write.parquet(str(staging / "holdout"))
            (staging / "fingerprint.txt").write_text(fingerprint + "\n")
    finally:
        for cached in (*activity.values(), maps.users, maps.items):
            cached.unpersist()
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
        "window_events": float(fingerprint.split(":")[0]),
        **dropped,
    }
    run.write_metrics("interactions", metrics)
    return metrics
