"""Ingest the run's window of the source into the lake, quarantining bad records."""

from __future__ import annotations

import shutil
from datetime import date
from typing import Any

from pyspark.sql import SparkSession

from recsys_pipeline.driver_ingest import driver_source, ingest_on_driver
from recsys_pipeline.erasure import ErasureLedger, Forgotten, erase_rows, parquet_files
from recsys_pipeline.events import (
    EmptyIntervalError,
    IngestResult,
    check_quarantine_share,
    companion_files,
    count_lake_events,
    ingest,
    ingest_settings_hash,
    ingest_window,
    ledger_dates,
    ledger_entry,
    read_ledger,
    read_source,
    record_counts,
    restore_lake,
    source_files,
    stale_files,
    write_lake,
    write_ledger,
    write_quarantine,
)
from recsys_pipeline.runs import RunContext, now_utc


def run_ingest(spark: SparkSession, run: RunContext) -> dict[str, float]:
    """Bring the lake up to date with the source for the run's window; write the quarantine table
    and metrics.

    A run reads only the source files the lake has not taken in as they are now, and any file
    sharing a date with them (all of them with ``events.incremental: false``, when the lake has no
    ledger yet, or when the source or events settings changed since). A refresh takes in its
    interval only and leaves the ledger as it is: the files it read may hold other days the next
    full run must still take in. A run whose own interval then holds no event in the lake fails:
    training on whatever older events the lake holds would publish a stale model as if it were new.
    """
    config = run.config
    window_start, window_end = ingest_window(run)
    lake = run.layout.events_lake
    listing = source_files(config.source)
    settings = ingest_settings_hash(config.source, config.events)
    forgotten = ErasureLedger(run.layout).forgotten()
    with run.layout.lock():
        restore_lake(lake)
        ledger = read_ledger(lake, settings) if config.events.incremental else {}
        stale = stale_files(listing, ledger) if ledger else list(listing)
        removed = sorted(set(ledger) - set(listing))
        replaced: set[date] | None = None
        result: IngestResult | None = None
        if ledger:
            replaced = set().union(
                *(ledger_dates(ledger[path]) for path in [*stale, *removed] if path in ledger)
            )
            if stale:
                result = _ingest_files(spark, run, stale, None, forgotten)
                replaced |= set().union(*(summary.dates for summary in result.files.values()))
            companions = companion_files(listing, ledger, stale, replaced)
            if companions:
                result = _ingest_files(spark, run, [*stale, *companions], replaced, forgotten)
        else:
            result = _ingest_files(spark, run, None, None, forgotten)
        metrics = _metrics(result, listing, ledger)
        if result is not None:
            write_quarantine(run.artifacts.ingest_staging, run.quarantine_dir)
            if forgotten is not None:
                # A record too broken to map still names its user somewhere in its raw form.
                scrubbed = erase_rows(parquet_files(run.quarantine_dir), ["raw_record"], forgotten)
                metrics["quarantine_erased"] = float(scrubbed.rows_removed)
            check_quarantine_share(result.metrics, config.events.max_quarantine_share)
            kept = write_lake(
                run.artifacts.ingest_staging, result.dates, lake, window_start, window_end, replaced
            )
        else:
            write_quarantine(None, run.quarantine_dir)
            kept = write_lake(run.artifacts.ingest_staging, {}, lake, window_start, window_end, replaced)
        if run.mode == "full":
            ledger = {path: entry for path, entry in ledger.items() if path in listing}
            if result is not None:
                for path, summary in result.files.items():
                    ledger[path] = ledger_entry(listing[path], summary, window_end)
            write_ledger(lake, settings, ledger)
        shutil.rmtree(run.artifacts.ingest_staging, ignore_errors=True)
        interval_events = count_lake_events(lake, run.interval_start, run.interval_end)
    metrics["events_in_interval"] = float(interval_events)
    metrics["lake_dates_unchanged"] = float(len(kept))
    run.artifacts.write_metrics("ingest", metrics)
    if interval_events == 0:
        raise EmptyIntervalError(
            f"no events between {run.interval_start.isoformat()} and {run.interval_end.isoformat()} in "
            f"{config.source.path} ({int(metrics['events_read'])} records read): check source.path "
            "and the run's date; nothing was trained or published"
        )
    return metrics


def _ingest_files(
    spark: SparkSession,
    run: RunContext,
    files: list[str] | None,
    dates: set[date] | None,
    forgotten: Forgotten | None,
) -> IngestResult:
    """The run's ``files`` of the source (all of them: None) classified and staged: by Arrow on the
    driver when they are few and Parquet that both read alike (:func:`driver_source`), else by Spark."""
    config = run.config
    window_start, window_end = ingest_window(run)
    staging = run.artifacts.ingest_staging
    erased = (forgotten.salt, forgotten.user_hashes) if forgotten is not None else None
    paths = files if files is not None else list(source_files(config.source))
    found = driver_source(config.source, paths, config.spark.small_input_max_events)
    if found is not None:
        result = ingest_on_driver(
            found, config.source, config.events, window_start, window_end, now_utc(), staging, dates, erased
        )
    else:
        raw = read_source(spark, config.source, files)
        result = ingest(
            raw, config.source, config.events, window_start, window_end, now_utc(), staging, dates, erased
        )
    result.metrics["ingested_on_driver"] = float(found is not None)
    return result


def _metrics(
    result: IngestResult | None, listing: dict[str, str], ledger: dict[str, dict[str, Any]]
) -> dict[str, float]:
    read = len(result.files) if result is not None else 0
    metrics = dict(result.metrics) if result is not None else record_counts(0, {})
    metrics.update(
        {
            "source_files": float(len(listing)),
            "source_files_read": float(read),
            "source_files_skipped": float(len(listing) - read),
            "source_files_removed": float(len(set(ledger) - set(listing))),
        }
    )
    return metrics
