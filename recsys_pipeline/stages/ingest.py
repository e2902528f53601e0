"""Ingest the run's window of the source into the lake, quarantining bad records."""

from __future__ import annotations

from pyspark.sql import SparkSession

from recsys_pipeline.events import check_quarantine_share, ingest, ingest_window, read_source, write_lake
from recsys_pipeline.runs import RunContext, now_utc


def run_ingest(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Ingest the run's window into the lake; write the quarantine table and metrics."""
    config = run.config
    window_start, window_end = ingest_window(run)
    raw = read_source(spark, config.source)
    result = ingest(raw, config.source, config.events, window_start, window_end, now_utc())
    result.quarantine.write.mode("overwrite").parquet(str(run.layout.quarantine / run.interval_key))
    run.write_metrics("ingest", result.metrics)
    check_quarantine_share(result.metrics, config.events.max_quarantine_share)
    if result.metrics["events_ingested"] > 0:
        write_lake(result.events, run.layout.events_lake, window_start, window_end)
    return result.metrics
