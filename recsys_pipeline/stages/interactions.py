"""Build the run's confidence matrices, holdout and ID maps from the lake (Spark)."""

from __future__ import annotations

import shutil
from datetime import datetime

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_pipeline.events import history_window, read_lake
from recsys_pipeline.interactions import (
    INDEX_PAIR,
    EmptyInteractionsError,
    IdMaps,
    PairCounts,
    aggregate,
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

    The holdout follows ``interactions.holdout``; a refresh run holds nothing out: its model is the
    champion's, folded over the whole history. A full run whose holdout has fewer users to evaluate
    than ``evaluation.min_users`` fails here, before anything is trained on it. ``recent/`` lists the
    users and items with events in the run's own interval.
    """
    config = run.config.interactions
    window_start, window_end = history_window(run)
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
    cached: list[DataFrame] = [*activity.values(), maps.users, maps.items]
    try:
        # Ids become dense indices before the aggregation: integer pairs shuffle and hash far cheaper than
        # strings.
        indexed = indexed_events(events, maps)
        train_counts = PairCounts("train")
        train_pairs, holdout_pairs = split(events, indexed, run, window_end, train_counts, cached)
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
                    f"no interactions left to train on in the window {window_start.isoformat()} to "
                    f"{window_end.isoformat()} after the holdout: check the source, the window, the "
                    "event weights and interactions.holdout"
                )
            matrix_columns(holdout_pairs).write.parquet(str(staging / "holdout"))
            evaluable = evaluable_users(
                spark.read.parquet(str(staging / "holdout")), spark.read.parquet(str(staging / "train"))
            )
            if run.mode != "refresh":
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


def split(
    events: DataFrame,
    indexed: DataFrame,
    run: RunContext,
    window_end: datetime,
    train_counts: PairCounts,
    cached: list[DataFrame],
) -> tuple[DataFrame, DataFrame]:
    """(training pairs, holdout pairs) of the window's events (``indexed``: with their ID indices), by
    the run's holdout strategy; frames it persists are appended to ``cached`` for the caller to release."""
    config = run.config.interactions
    holdout_only = config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1})
    if run.mode != "refresh" and config.holdout.strategy == "per_user_last":
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
    cut = window_end if run.mode == "refresh" else holdout_cut(events, config.holdout, window_end)
    before_cut = F.col("event_ts") < F.lit(cut)
    return (
        aggregate(indexed.where(before_cut), config, F.lit(cut), INDEX_PAIR, train_counts),
        aggregate(indexed.where(~before_cut), holdout_only, F.lit(window_end), INDEX_PAIR),
    )
