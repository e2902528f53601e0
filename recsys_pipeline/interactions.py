"""Build the user-item confidence matrix, its time-based holdout and stable ID maps.

Outputs under ``<run_dir>/interactions``::

    train/     Parquet (user_idx INT, item_idx INT, confidence FLOAT)   events before the holdout
    holdout/   Parquet (user_idx INT, item_idx INT, confidence FLOAT)   the last holdout_days
    maps/users, maps/items   Parquet (id STRING, idx INT)                snapshot of the ID maps used
    recent/users, recent/items   Parquet (idx INT)                       active in the run's interval
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
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


def aggregate(events: DataFrame, config: InteractionsConfig, as_of: Column) -> DataFrame:
    """(user_id, item_id, confidence) with decay, aggregation, cap and min-support filters."""
    weighted = events.withColumn("confidence", confidence_expression(config))
    if config.half_life_days:
        age_days = (F.unix_timestamp(as_of) - F.unix_timestamp("event_ts")) / 86400.0
        weighted = weighted.withColumn(
            "confidence", F.col("confidence") * F.pow(0.5, age_days / config.half_life_days)
        )
    combine = F.sum if config.aggregation == "sum" else F.max
    pairs = (
        weighted.groupBy("user_id", "item_id")
        .agg(combine("confidence").alias("confidence"))
        .where(F.col("confidence") > 0)
        .withColumn("confidence", F.least(F.col("confidence"), F.lit(config.max_confidence)))
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
    events = read_lake(spark, run.layout.events_lake, window_start, window_end).cache()
    fingerprint_row = events.agg(
        F.count("*").alias("n"),
        F.sum(
            F.xxhash64("user_id", "item_id", "event_type", "value", "event_ts").cast("decimal(38,0)")
        ).alias("h"),
    ).collect()[0]
    train_events = events.where(F.col("event_ts") < F.lit(holdout_start))
    holdout_events = events.where(F.col("event_ts") >= F.lit(holdout_start))
    train_pairs = aggregate(train_events, config, F.lit(holdout_start))
    holdout_pairs = aggregate(
        holdout_events,
        config.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1}),
        F.lit(window_end),
    )
    if train_pairs.limit(1).count() == 0:
        raise EmptyInteractionsError(
            f"no interactions before {holdout_start.isoformat()} in the window starting "
            f"{window_start.isoformat()}: check the source, the window and the event weights"
        )

    map_dir = run.layout.id_maps
    users = extend_id_map(_read_map(spark, map_dir / "users"), events.select("user_id")).cache()
    items = extend_id_map(_read_map(spark, map_dir / "items"), events.select("item_id")).cache()
    maps = IdMaps(users, items)
    out = run.stage_dir("interactions")
    with atomic_dir(out) as staging:
        _indexed(train_pairs, maps).write.parquet(str(staging / "train"))
        _indexed(holdout_pairs, maps).write.parquet(str(staging / "holdout"))
        users.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / "users"))
        items.orderBy("idx").coalesce(1).write.parquet(str(staging / "maps" / "items"))
        recent = events.where(F.col("event_ts") >= F.lit(run.interval_start))
        for name, column, id_map in (("users", "user_id", users), ("items", "item_id", items)):
            (
                recent.select(F.col(column).alias("id"))
                .distinct()
                .join(id_map, "id")
                .select("idx")
                .coalesce(1)
                .write.parquet(str(staging / "recent" / name))
            )
    # The shared maps advance only after this run's outputs are safely in place.
    for name in ("users", "items"):
        with atomic_dir(map_dir / name) as staging:
            shutil.copytree(out / "maps" / name, staging)

    train = read_matrix(out / "train")
    holdout = read_matrix(out / "holdout")
    metrics = {
        "users": float(count_rows(out / "maps" / "users")),
        "items": float(count_rows(out / "maps" / "items")),
        "train_interactions": float(train.nnz),
        "holdout_interactions": float(holdout.nnz),
        "holdout_users": float(len(np.unique(holdout.user_idx))),
        "window_events": float(fingerprint_row["n"]),
    }
    run.write_metrics("interactions", metrics)
    (out / "fingerprint.txt").write_text(f"{fingerprint_row['n']}:{fingerprint_row['h']}\n")
    return metrics
