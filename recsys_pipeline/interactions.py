"""Build the user-item confidence matrix, its time-based holdout and stable ID maps.

Outputs under ``<run_dir>/interactions``::

    train/     Parquet (user_idx INT, item_idx INT, confidence FLOAT)   events before the holdout
    holdout/   Parquet (user_idx INT, item_idx INT, confidence FLOAT)   the last holdout_days
    maps/users, maps/items   Parquet (id STRING, idx INT)                snapshot of the ID maps used
    recent/users, recent/items   Parquet (idx INT)                       active in the run's interval
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys_pipeline.config import InteractionsConfig
from recsys_pipeline.events import history_window, read_lake
from recsys_pipeline.runs import RunContext, atomic_dir
from recsys_pipeline.tables import count_rows, read_matrix


class EmptyInteractionsError(RuntimeError):
    """No usable interaction is left in the training window."""


@dataclass(frozen=True)
class IdMaps:
    users: DataFrame
    items: DataFrame


def confidence_expression(config: InteractionsConfig) -> Column:
    """Per-event confidence: event-type weight times the value multiplier."""
    expression: Column = F.lit(0.0)
    for event_type, spec in reversed(list(config.event_weights.items())):
        multiplier: Column = F.lit(1.0)
        if spec.value_map:
            mapped = F.create_map(*[F.lit(v) for pair in spec.value_map.items() for v in pair])
            multiplier = F.coalesce(mapped[F.col("value")], F.lit(0.0))
        elif spec.scale_by_value:
            multiplier = F.coalesce(F.col("value"), F.lit(0.0))
        expression = F.when(F.col("event_type") == event_type, F.lit(spec.weight) * multiplier).otherwise(
            expression
        )
    return expression


def decayed(config: InteractionsConfig, as_of: Column) -> Column:
    """Per-event confidence, halved every ``half_life_days`` of age at ``as_of`` (if decay is on)."""
    confidence = confidence_expression(config)
    if not config.half_life_days:
        return confidence
    age_days = (F.unix_timestamp(as_of) - F.unix_timestamp("event_ts")) / 86400.0
    return confidence * F.pow(0.5, age_days / config.half_life_days)


def _combine(config: InteractionsConfig) -> Callable[[Column], Column]:
    return F.sum if config.aggregation == "sum" else F.max


def supported(pairs: DataFrame, config: InteractionsConfig) -> DataFrame:
    """Positive, capped (user_id, item_id, confidence) pairs that meet the min-support filters."""
    pairs = pairs.where(F.col("confidence") > 0).withColumn(
        "confidence", F.least(F.col("confidence"), F.lit(config.max_confidence))
    )
    if config.min_item_interactions > 1:
        pairs = (
            pairs.withColumn("n", F.count("*").over(Window.partitionBy("item_id")))
            .where(F.col("n") >= config.min_item_interactions)
            .drop("n")
        )
    if config.min_user_interactions > 1:
        pairs = (
            pairs.withColumn("n", F.count("*").over(Window.partitionBy("user_id")))
            .where(F.col("n") >= config.min_user_interactions)
            .drop("n")
        )
    return pairs


def aggregate(events: DataFrame, config: InteractionsConfig, as_of: Column) -> DataFrame:
    """(user_id, item_id, confidence) with decay, aggregation, cap and min-support filters."""
    pairs = events.groupBy("user_id", "item_id").agg(
        _combine(config)(decayed(config, as_of)).alias("confidence")
    )
    return supported(pairs, config)


def pair_totals(
    events: DataFrame,
    config: InteractionsConfig,
    holdout_start: datetime,
    window_end: datetime,
    recent_start: datetime,
) -> DataFrame:
    """Everything the stage needs from the events, in one shuffle: per (user, item) the training and
    holdout confidence, whether it is active since ``recent_start``, and its events' count and hash sum
    (the run's input fingerprint)."""
    combine = _combine(config)
    in_training = F.col("event_ts") < F.lit(holdout_start)
    return events.groupBy("user_id", "item_id").agg(
        combine(F.when(in_training, decayed(config, F.lit(holdout_start)))).alias("train_confidence"),
        combine(F.when(~in_training, decayed(config, F.lit(window_end)))).alias("holdout_confidence"),
        F.max(F.col("event_ts") >= F.lit(recent_start)).alias("recent"),
        F.count("*").alias("events"),
        # A 64-bit hash summed as two 32-bit halves: long sums cannot overflow below 2^31 events
        # and are far cheaper than decimal arithmetic.
        F.sum(F.shiftrightunsigned(_event_hash(), 32)).alias("hash_high"),
        F.sum(_event_hash().bitwiseAND(F.lit(0xFFFFFFFF))).alias("hash_low"),
    )


def _event_hash() -> Column:
    return F.xxhash64("user_id", "item_id", "event_type", "value", "event_ts")


def extend_id_map(existing: DataFrame | None, ids: DataFrame) -> DataFrame:
    """Append unseen ids with indices after the current maximum; existing indices never change.

    New ids are numbered in sorted order so that re-running the same input gives the same map.
    """
    distinct = ids.select(F.col(ids.columns[0]).alias("id")).distinct()
    if existing is None:
        return distinct.withColumn("idx", (F.row_number().over(Window.orderBy("id")) - 1).cast("int"))
    offset = existing.agg(F.coalesce(F.max("idx") + 1, F.lit(0))).collect()[0][0]
    new = distinct.join(existing, "id", "left_anti")
    numbered = new.withColumn(
        "idx", (F.row_number().over(Window.orderBy("id")) - 1 + F.lit(offset)).cast("int")
    )
    return existing.unionByName(numbered)


def _read_map(spark: SparkSession, path: Path) -> DataFrame | None:
    return spark.read.parquet(str(path)) if path.exists() else None


def _indexed(pairs: DataFrame, maps: IdMaps) -> DataFrame:
    users = maps.users.withColumnRenamed("id", "user_id").withColumnRenamed("idx", "user_idx")
    items = maps.items.withColumnRenamed("id", "item_id").withColumnRenamed("idx", "item_idx")
    return (
        pairs.join(users, "user_id")
        .join(items, "item_id")
        .select("user_idx", "item_idx", F.col("confidence").cast("float"))
    )


def run_interactions(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Read the history from the lake, extend the ID maps, write train/holdout matrices.

    A refresh run holds nothing out: its model is the champion's, folded over the whole history.
    ``recent/`` lists the users and items with events in the run's own interval.
    """
    config = run.config.interactions
    window_start, window_end = history_window(run)
    holdout_days = 0 if run.mode == "refresh" else config.holdout_days
    holdout_start = window_end - timedelta(days=holdout_days)
    events = read_lake(spark, run.layout.events_lake, window_start, window_end)
    totals = pair_totals(events, config, holdout_start, window_end, run.interval_start).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    fingerprint_row = totals.agg(
        F.sum("events").alias("n"), F.sum("hash_high").alias("high"), F.sum("hash_low").alias("low")
    ).collect()[0]
    train_pairs = supported(
        totals.select("user_id", "item_id", F.col("train_confidence").alias("confidence")), config
    )
    holdout_pairs = supported(
        totals.select("user_id", "item_id", F.col("holdout_confidence").alias("confidence")),
        config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1}),
    )
    if train_pairs.limit(1).count() == 0:
        raise EmptyInteractionsError(
            f"no interactions before {holdout_start.isoformat()} in the window starting "
            f"{window_start.isoformat()}: check the source, the window and the event weights"
        )

    map_dir = run.layout.id_maps
    # One small aggregate per side gives both the ids to map and which of them were active lately.
    activity = {
        column: totals.groupBy(F.col(column).alias("id")).agg(F.max("recent").alias("recent")).cache()
        for column in ("user_id", "item_id")
    }
    users = extend_id_map(_read_map(spark, map_dir / "users"), activity["user_id"].select("id")).cache()
    items = extend_id_map(_read_map(spark, map_dir / "items"), activity["item_id"].select("id")).cache()
    maps = IdMaps(users, items)
    out = run.stage_dir("interactions")
    with atomic_dir(out) as staging:
        _indexed(train_pairs, maps).write.parquet(str(staging / "train"))
        _indexed(holdout_pairs, maps).write.parquet(str(staging / "holdout"))
        users.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / "users"))
        items.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / "items"))
        for name, column, id_map in (("users", "user_id", users), ("items", "item_id", items)):
            (
                activity[column]
                .where("recent")
                .join(id_map, "id")
                .select("idx")
                .coalesce(1)
                .write.parquet(str(staging / "recent" / name))
            )
    # The shared maps advance only after this run's outputs are safely in place.
    for name in ("users", "items"):
        with atomic_dir(map_dir / name) as staging:
            shutil.copytree(out / "maps" / name, staging)

    holdout = read_matrix(out / "holdout")
    metrics = {
        "users": float(count_rows(out / "maps" / "users")),
        "items": float(count_rows(out / "maps" / "items")),
        "train_interactions": float(count_rows(out / "train")),
        "holdout_interactions": float(holdout.nnz),
        "holdout_users": float(len(np.unique(holdout.user_idx))),
        "window_events": float(fingerprint_row["n"] or 0),
    }
    totals.unpersist()
    run.write_metrics("interactions", metrics)
    n, high, low = fingerprint_row["n"], fingerprint_row["high"], fingerprint_row["low"]
    (out / "fingerprint.txt").write_text(f"{n}:{high}:{low}\n")
    return metrics
