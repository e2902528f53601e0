"""Ingest the run's window of the source into the lake, quarantining bad records."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys_pipeline.events import (
    EmptyIntervalError,
    check_quarantine_share,
    ingest,
    ingest_window,
    read_source,
    write_lake,
)
from recsys_pipeline.runs import RunContext, now_utc


def run_ingest(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Ingest the run's window into the lake; write the quarantine table and metrics.

    A run whose own interval holds no event fails: training on whatever older events the lake
    holds would publish a stale model as if it were new.
    """
    config = run.config
    window_start, window_end = ingest_window(run)
    raw = read_source(spark, config.source)
    result = ingest(raw, config.source, config.events, window_start, window_end, now_utc())
    result.quarantine.write.mode("overwrite").parquet(str(run.quarantine_dir))
    interval_events = result.events.where(F.col("event_ts") >= F.lit(run.interval_start)).count()
    run.write_metrics("ingest", {**result.metrics, "events_in_interval": float(interval_events)})
    check_quarantine_share(result.metrics, config.events.max_quarantine_share)
    if interval_events == 0:
        raise EmptyIntervalError(
            f"no events between {run.interval_start.isoformat()} and {run.interval_end.isoformat()} in "
            f"{config.source.path} ({int(result.metrics['events_read'])} records read): check source.path "
            "and the run's date; nothing was trained or published"
        )
    if result.metrics["events_ingested"] > 0:
        with run.layout.lock():
            write_lake(result.events, run.layout.events_lake, window_start, window_end)
    return result.metrics
