"""Ingest raw events into a date-partitioned Parquet lake, quarantining bad records.

Canonical event schema (one row per event)::

    user_id STRING, item_id STRING, event_type STRING, value DOUBLE,
    event_ts TIMESTAMP, ingested_at TIMESTAMP, source STRING   -- partitioned by event_date DATE

Every source row read ends up in exactly one of: the lake, the quarantine table (with a
reason), the ``events_outside_window`` count, or (a user someone asked to forget) the
``events_erased_at_ingest`` count.

A full run reads only the source files that changed since the lake last took them in (a ledger
in the lake keeps each file's size, modification time and the dates it filled), plus any other
file holding one of the dates those touch, and replaces exactly those dates.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, DataFrameReader, DataFrameWriter, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_pipeline.config import EventsConfig, SourceConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir, replace_file, restore_set_aside, write_json
from recsys_pipeline.hashing import hash_sums_of
from recsys_pipeline.runs import RunContext
from recsys_pipeline.sets import member_of
from recsys_pipeline.spark import label_actions

CORRUPT_COLUMN = "_corrupt_record"
SOURCE_FILE_COLUMN = "_source_file"
# A staged row's source file, as its rank among the files read by name: a number on every row where
# the file's URI (tens of bytes) made the shuffle by date 10% slower; the deduplication's order.
FILE_RANK_COLUMN = "_source_file_rank"
# Spark and pyarrow skip files whose names start with "_" when they read the lake.
LEDGER_FILE = "_source_ledger.json"
# C0 and C1 control characters (tabs and newlines included): never part of a real id.
CONTROL_CHARACTERS = "[\\x00-\\x1f\\x7f-\\x9f]"
SECONDS_PER_DAY = 86_400
EVENT_COLUMNS = ["user_id", "item_id", "event_type", "value", "event_ts", "ingested_at", "source"]
LAKE_SCHEMA = (
    "user_id STRING, item_id STRING, event_type STRING, value DOUBLE, event_ts TIMESTAMP, "
    "ingested_at TIMESTAMP, source STRING, event_date DATE"
)
# What ingest stages: the lake's columns, the quarantine's and the file each record came from.
STAGING_SCHEMA = (
    f"{LAKE_SCHEMA}, reason STRING, raw_record STRING, {SOURCE_FILE_COLUMN} STRING, {FILE_RANK_COLUMN} INT"
)

# Checked in this order; a record is quarantined with the first reason that applies.
QUARANTINE_REASONS = (
    "unparseable_record",
    "missing_user_id",
    "missing_item_id",
    "invalid_id",
    "unknown_event_type",
    "invalid_value",
    "unparseable_timestamp",
    "invalid_timestamp",
    "before_floor",
    "future_timestamp",
    "duplicate",
)


class QuarantineThresholdError(RecsysError):
    """Too large a share of a run's records was quarantined to trust the rest."""


class EmptyIntervalError(RecsysError):
    """The run's own interval has no events: the feed stopped, or the source points elsewhere."""


class SourceMissingError(RecsysError):
    """``source.path`` names nothing readable."""


class SourceHeaderError(RecsysError):
    """A CSV file's header lacks a column the mapping reads."""


DateContents = tuple[int, int, int]  # a date's events: count, sums of their hashes' halves


@dataclass(frozen=True)
class FileSummary:
    """What one read of a source file put in the lake."""

    dates: frozenset[date]  # dates of its events that went into the lake
    latest_event: datetime | None  # its latest parseable timestamp, inside the window or not


def source_files(source: SourceConfig) -> dict[str, str]:
    """``{path: fingerprint}`` of every data file of the source (the file itself, the files a glob
    pattern matches, or the files under the folder, hidden and ``_``-prefixed ones aside); the
    fingerprint is size and modification time."""
    root = source.path
    if any(character in str(root) for character in "*?["):
        paths = sorted(Path(match) for match in glob.glob(str(root), recursive=True) if Path(match).is_file())
    elif root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(
            path
            for path in root.rglob("*")
            if path.is_file()
            and not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)
        )
    else:
        paths = []
    if not paths:
        raise SourceMissingError(f"source.path {root} holds no file to read: check source.path")
    # Keyed as Spark names the files it read (absolute, '.' and '..' resolved), so what a read
    # reports always finds its file here, however source.path was written.
    return {
        os.path.normpath(os.path.abspath(path)): f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
        for path in paths
    }


def ingest_settings_hash(source: SourceConfig, events: EventsConfig) -> str:
    """sha256 of every setting that shapes what a source file becomes in the lake: the lake's
    content from a file read under other settings is not this run's to keep."""
    settings = {
        "source": source.model_dump(mode="json"),
        "events": events.model_dump(mode="json", exclude={"incremental"}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_ledger(lake: Path, settings_hash: str) -> dict[str, dict[str, Any]]:
    """The files the lake took in under these settings; none when it has no ledger or another one."""
    path = lake / LEDGER_FILE
    if not path.exists():
        return {}
    ledger = json.loads(path.read_text())
    return dict(ledger["files"]) if ledger.get("settings") == settings_hash else {}


def write_ledger(lake: Path, settings_hash: str, files: Mapping[str, dict[str, Any]]) -> None:
    write_json(lake / LEDGER_FILE, {"settings": settings_hash, "files": dict(files)})


def ledger_entry(fingerprint: str, summary: FileSummary, ingested_until: datetime) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "dates": sorted(day.isoformat() for day in summary.dates),
        "latest_event": summary.latest_event.isoformat() if summary.latest_event else None,
        "ingested_until": ingested_until.isoformat(),
    }


def ledger_dates(entry: Mapping[str, Any]) -> set[date]:
    return {date.fromisoformat(day) for day in entry["dates"]}


def stale_files(listing: Mapping[str, str], ledger: Mapping[str, dict[str, Any]]) -> list[str]:
    """Files the lake has not fully taken in: new, changed since, or holding events later than the
    window that last read them."""
    stale = []
    for path, fingerprint in listing.items():
        entry = ledger.get(path)
        if (
            entry is None
            or entry["fingerprint"] != fingerprint
            or (entry["latest_event"] is not None and entry["latest_event"] >= entry["ingested_until"])
        ):
            stale.append(path)
    return stale


def companion_files(
    listing: Mapping[str, str], ledger: Mapping[str, dict[str, Any]], stale: Collection[str], dates: set[date]
) -> list[str]:
    """Files not stale that hold events on ``dates``: a date is replaced from every file that has it."""
    return [
        path
        for path in listing
        if path not in stale and path in ledger and ledger_dates(ledger[path]) & dates
    ]


@dataclass(frozen=True)
class IngestResult:
    """Where the records read went; the rows themselves are in the staging folder ingest wrote."""

    metrics: dict[str, float]
    files: dict[str, FileSummary]  # per source file read
    dates: dict[date, DateContents]  # what the events hold per date


def read_source(spark: SparkSession, source: SourceConfig, files: list[str] | None = None) -> DataFrame:
    """The source (or only ``files`` of it) as string columns, plus the corrupt-record column and the
    file each row came from; a Parquet source's numeric value and timestamp columns keep their type
    (:func:`numeric_columns`).

    Spark's permissive CSV mode puts a row with more or fewer fields than the schema
    into the corrupt-record column, which becomes the ``unparseable_record`` reason.
    """
    paths = files if files is not None else [str(source.path)]
    if source.format == "parquet":
        reader = spark.read
        if source.path.is_dir():  # partition columns of a folder's files keep their values
            reader = reader.option("basePath", str(source.path))
        frame = reader.parquet(*paths)
        numeric = numeric_columns(frame.schema, source)
        return frame.select(
            *[F.col(c) if c in numeric else as_text(c) for c in frame.columns],
            F.lit(None).cast("string").alias(CORRUPT_COLUMN),
            F.input_file_name().alias(SOURCE_FILE_COLUMN),
        )
    reader = spark.read.option("sep", source.delimiter).option("header", source.header)
    if source.column_names or not source.header:
        names = source.column_names or reader.csv(paths[0]).columns
        return _read_csv(reader, paths, names).withColumn(SOURCE_FILE_COLUMN, F.input_file_name())
    # Each file by its own header: Spark applies one schema by position to every file, so a file
    # whose header orders the columns differently would have them swapped without a word.
    by_header: dict[tuple[str, ...], list[str]] = {}
    for path in files if files is not None else list(source_files(source)):
        header = csv_header(Path(path), source.delimiter)
        if header:  # an empty file has no rows to read either
            by_header.setdefault(header, []).append(path)
    if not by_header:
        raise SourceMissingError(f"source.path {source.path} holds only empty files: check source.path")
    needed = sorted({name for name in source.mapping.values() if name})
    first_header, first_files = next(iter(by_header.items()))
    for header, group in by_header.items():
        missing = [name for name in needed if name not in header]
        if missing:
            raise SourceHeaderError(
                f"source file {group[0]} has the header {list(header)}, without the column(s) {missing} "
                f"that source.mapping reads (file {first_files[0]} has {list(first_header)}): fix that "
                "file's header or the mapping"
            )
    frames = [_read_csv(reader, group, list(header)) for header, group in by_header.items()]
    frame = frames[0]
    for other in frames[1:]:
        frame = frame.unionByName(other, allowMissingColumns=True)
    return frame.withColumn(SOURCE_FILE_COLUMN, F.input_file_name())


def numeric_columns(schema: T.StructType, source: SourceConfig) -> set[str]:
    """The source columns of ``schema`` that the value and a numeric timestamp are read from as they
    are, rather than as text: integers and doubles, whose text parses back to the same double.

    Formatting 20M numbers as text only to parse them again took 3 s of the 44 s that staging 20M
    events took. A float would parse back as its shortest decimal, not its own value, and a timestamp
    by ``timestamp_format`` is text: both stay text (:func:`as_text`), as every other column."""
    wanted = [source.mapping.get("value")]
    if source.timestamp_unit != "format":
        wanted.append(source.mapping.get("timestamp"))
    return {
        field.name
        for field in schema.fields
        if field.name in wanted and isinstance(field.dataType, T.IntegralType | T.DoubleType)
    }


def as_text(name: str) -> Column:
    """Column ``name`` as text, under its own name: how records keep the values they came with."""
    return F.col(name).cast("string").alias(name)


def _read_csv(reader: DataFrameReader, paths: list[str], names: list[str]) -> DataFrame:
    schema = T.StructType([T.StructField(name, T.StringType()) for name in [*names, CORRUPT_COLUMN]])
    return (
        reader.schema(schema)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT_COLUMN)
        .csv(paths)
    )


def csv_header(path: Path, delimiter: str) -> tuple[str, ...]:
    """A CSV file's column names, from its first line (gzip-compressed files too, as Spark reads them)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as lines:
        return tuple(name.strip() for name in next(csv.reader(lines, delimiter=delimiter), []))


def file_path(uri: str) -> str:
    """The local path of a file URI as Spark reports it (``file:///a%20b.csv`` -> ``/a b.csv``)."""
    return unquote(urlsplit(uri).path) if uri.startswith("file:") else uri


def _timestamp(raw: Column, source: SourceConfig) -> Column:
    if source.timestamp_unit == "format":
        return F.try_to_timestamp(raw, F.lit(source.timestamp_format))
    number = raw.try_cast("double")
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[source.timestamp_unit]
    # try_cast: a number beyond the microseconds a long holds (or infinite) is null, not an ANSI
    # CAST_OVERFLOW that would fail the whole job, and every later one reading the same file.
    micros = (number / scale * 1e6).try_cast("long")
    return F.when(F.isnan(number), None).otherwise(F.timestamp_micros(micros))


def canonicalize(
    raw: DataFrame, source: SourceConfig, events: EventsConfig, ingested_at: datetime
) -> DataFrame:
    """Map source columns onto the canonical schema and tag each row with a reason if it is bad."""
    column = {field: F.col(name) for field, name in source.mapping.items() if name}
    source_columns = [c for c in raw.columns if c not in (CORRUPT_COLUMN, SOURCE_FILE_COLUMN)]
    raw_value = column.get("value", F.lit(None).cast("string"))
    event_type = (
        F.lower(F.trim(column["event_type"])) if "event_type" in column else F.lit(source.default_event_type)
    )
    # A record is kept as text, as it came (numeric columns included, as read_source leaves them).
    record = F.to_json(F.struct(*[as_text(c) for c in source_columns]))
    frame = raw.select(
        F.coalesce(F.col(CORRUPT_COLUMN), record).alias("source_record"),
        F.col(CORRUPT_COLUMN).isNotNull().alias("corrupt"),
        F.trim(column["user_id"]).alias("user_id"),
        F.trim(column["item_id"]).alias("item_id"),
        event_type.alias("event_type"),
        raw_value.alias("raw_value"),
        raw_value.try_cast("double").alias("value"),
        column["timestamp"].alias("raw_ts"),
        _timestamp(column["timestamp"], source).alias("event_ts"),
        F.col(SOURCE_FILE_COLUMN),
    )
    bad_value = (F.col("raw_value").isNotNull() & F.col("value").isNull()) | (
        F.col("value").isNotNull()
        & (F.isnan("value") | (F.col("value") < 0) | F.col("value").isin(float("inf"), float("-inf")))
    )
    # A number that is no time (infinite, or beyond the timestamp range); NaN counts as unparseable.
    raw_number = F.col("raw_ts").try_cast("double")
    timestamp_is_number = (
        F.lit(source.timestamp_unit != "format") & raw_number.isNotNull() & ~F.isnan(raw_number)
    )
    # One pattern search over both ids (a search first copies Spark's string into a Java one): over
    # 20M events' ids, 5.3-6.2 s against 6.1-6.8 for a search per id, 2.7-3.4 for none.
    invalid_id = (
        (F.length("user_id") > events.max_id_length)
        | (F.length("item_id") > events.max_id_length)
        | F.concat("user_id", "item_id").rlike(CONTROL_CHARACTERS)
    )
    reason = (
        F.when(F.col("corrupt"), "unparseable_record")
        .when(F.col("user_id").isNull() | (F.col("user_id") == ""), "missing_user_id")
        .when(F.col("item_id").isNull() | (F.col("item_id") == ""), "missing_item_id")
        .when(invalid_id, "invalid_id")
        .when(~F.coalesce(F.col("event_type").isin(events.event_types), F.lit(False)), "unknown_event_type")
        .when(bad_value, "invalid_value")
        .when(F.col("event_ts").isNull() & timestamp_is_number, "invalid_timestamp")
        .when(F.col("event_ts").isNull(), "unparseable_timestamp")
        .when(F.col("event_ts") < F.lit(events.min_event_time), "before_floor")
        .when(F.col("event_ts") > F.lit(ingested_at), "future_timestamp")
    )
    # Only a quarantined record keeps its source form: serialising every accepted one would cost more
    # than the rest of ingest.
    return (
        frame.withColumn("reason", reason)
        .withColumn("raw_record", F.when(F.col("reason").isNotNull(), F.col("source_record")))
        .drop("source_record")
        .withColumn("ingested_at", F.lit(ingested_at))
        .withColumn("source", F.lit(source.name))
    )


ERASED = "erased"
# Staged rows whose timestamp is outside the run's window (or its dates): only counted.
OUTSIDE_WINDOW = "outside_window"
# Reasons a staged row is only counted for, never quarantined.
COUNTED_ONLY = (ERASED, OUTSIDE_WINDOW)


def erase_forgotten(frame: DataFrame, salt: bytes, user_hashes: frozenset[str]) -> DataFrame:
    """Blank every event of a user the erasure ledger holds, leaving only its mark (``reason``
    ``erased``): nothing of it is staged, quarantined or written to the lake, only counted.

    The ids are hashed with the ledger's salt in an Arrow UDF: as a literal of the query, the salt
    would be printed in every plan and event log.
    """

    @F.arrow_udf("boolean")  # type: ignore[call-overload]
    def forgotten(ids: pa.Array) -> pa.Array:
        import hashlib

        import pyarrow.compute as pc

        distinct = pc.unique(ids).drop_null().to_pylist()
        hits = [v for v in distinct if hashlib.sha256(salt + v.encode()).hexdigest() in user_hashes]
        return pc.fill_null(pc.is_in(ids, value_set=pa.array(hits, pa.string())), False)

    erased = forgotten(F.col("user_id"))
    kept = ("ingested_at", "source", SOURCE_FILE_COLUMN)
    return frame.withColumn("_erased", erased).select(
        *[
            F.col(name)
            if name in kept
            else F.when(F.col("_erased"), F.lit(ERASED) if name == "reason" else F.lit(None))
            .otherwise(F.col(name))
            .cast(frame.schema[name].dataType)
            .alias(name)
            for name in frame.columns
        ]
    )


# What makes two valid events copies of one: the same values of these (and so the same date).
COPY_KEY = ["user_id", "item_id", "event_type", "value", "event_ts"]


def mark_duplicates(staging: Path, names: list[str]) -> None:
    """Tag, in the rows :func:`ingest` staged by date, all but one copy of each exactly repeated valid
    event as a duplicate: the copy from the first source file by name is kept (the files' ranks,
    :func:`with_file_ranks`, follow their names). A duplicate's ``raw_record`` is its mapped fields
    and its file (``names`` by rank): the copy it repeats is in the lake.

    Copies share their date: each date's keys are read apart (on a thread each) and only a date
    holding copies is rewritten. Numbered in a Spark window instead, with the sort that puts copies
    together, the copies took 15 s of the 48 s that staging 20M events took; here 2-3 s.
    """
    dates = sorted(staging.glob("event_date=*"))
    with ThreadPoolExecutor(max_workers=max(1, min(pa.cpu_count(), len(dates)))) as pool:
        list(pool.map(lambda folder: _mark_date(folder, names), dates))


def _mark_date(folder: Path, names: list[str]) -> None:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return
    keys = [
        pq.read_table(path, columns=[*COPY_KEY, "reason", FILE_RANK_COLUMN, SOURCE_FILE_COLUMN])
        for path in files
    ]
    duplicate = copies_after_the_first(pa.concat_tables(keys))
    if not duplicate.any():
        return
    start = 0
    for path, part in zip(files, keys, strict=True):
        marked = duplicate[start : start + part.num_rows]
        start += part.num_rows
        if marked.any():
            parquet = pq.ParquetFile(path)
            table = duplicate_records(parquet.read(), marked, names)
            metadata = parquet.schema_arrow.metadata
            replace_file(
                path,
                lambda staged: pq.write_table(
                    table.replace_schema_metadata(metadata), staged, compression=STAGED_COMPRESSION
                ),
            )


def copies_after_the_first(rows: pa.Table) -> np.ndarray:
    """Whether each of ``rows`` (:data:`COPY_KEY`, reason and the file's rank and name) is a valid
    event whose key an earlier valid row holds: earlier by file rank, then file, then position.

    Each key column is dictionary-encoded (nulls too). The valid rows' codes, mixed into one 64-bit
    number each, find the few rows that may share a key with another (one sort of numbers); only
    those are sorted by their codes and order, and a row repeats the key of the row before it
    exactly when every code does."""
    valid = np.flatnonzero(pc.is_null(rows.column("reason")).to_numpy(zero_copy_only=False))
    duplicate = np.zeros(rows.num_rows, dtype=bool)
    codes = [
        pc.dictionary_encode(rows.column(name).combine_chunks(), null_encoding="encode")
        .indices.to_numpy(zero_copy_only=False)[valid]
        .astype(np.uint64)
        for name in COPY_KEY
    ]
    mixed = np.zeros(len(valid), dtype=np.uint64)
    for code in codes:
        mixed = mixed * np.uint64(0x9E3779B97F4A7C15) + code  # wraps around: a hash, not a number
    ordered = np.sort(mixed)
    shared = member_of(mixed, ordered[1:][ordered[1:] == ordered[:-1]])
    if not shared.any():
        return duplicate
    candidates = valid[shared]
    keys = [code[shared] for code in codes]
    # The order among copies, read for the candidates alone.
    chosen = pa.array(candidates)
    rank = pc.fill_null(rows.column(FILE_RANK_COLUMN).take(chosen), -1).to_numpy(zero_copy_only=False)
    file = pc.dictionary_encode(
        rows.column(SOURCE_FILE_COLUMN).take(chosen).combine_chunks(), null_encoding="encode"
    )
    # np.lexsort sorts by its last key first: the key's codes, then file rank, file and position.
    order = np.lexsort([candidates, file.indices.to_numpy(zero_copy_only=False), rank, *reversed(keys)])
    repeats = np.ones(len(candidates), dtype=bool)
    repeats[0] = False
    for code in keys:
        ranked = code[order]
        repeats[1:] &= ranked[1:] == ranked[:-1]
    duplicate[candidates[order[repeats]]] = True
    return duplicate


def duplicate_records(rows: pa.Table, duplicate: np.ndarray, names: list[str]) -> pa.Table:
    """``rows`` with those ``duplicate`` marks tagged ``duplicate``, each with its mapped fields and its
    file as its record."""
    mask = pa.array(duplicate)
    found = rows.filter(mask).select([*COPY_KEY, FILE_RANK_COLUMN, SOURCE_FILE_COLUMN]).to_pylist()
    records = [
        json.dumps(
            {
                "user_id": row["user_id"],
                "item_id": row["item_id"],
                "event_type": row["event_type"],
                "value": row["value"],
                "event_ts": row["event_ts"].isoformat(),
                "source_file": file_path(
                    names[row[FILE_RANK_COLUMN]]
                    if row[FILE_RANK_COLUMN] is not None
                    else row[SOURCE_FILE_COLUMN]
                ),
            },
            separators=(",", ":"),
        )
        for row in found
    ]
    for name, values in (("reason", ["duplicate"] * len(records)), ("raw_record", records)):
        column = pc.replace_with_mask(rows.column(name).combine_chunks(), mask, pa.array(values, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index(name), name, column)
    return rows


def utc_date(timestamp: Column) -> Column:
    """The UTC date of ``timestamp``, by arithmetic on its seconds since the epoch: ``to_date``
    looks up the session's time zone for every row (UTC in every session, :mod:`recsys_pipeline.spark`),
    2.3% of a 20M-event ingest's JVM time; this took 0.3-0.8 s less a pass over 20M timestamps."""
    return F.date_from_unix_date(F.floor(F.unix_seconds(timestamp) / SECONDS_PER_DAY).cast("int"))


def with_file_ranks(frame: DataFrame, names: list[str]) -> DataFrame:
    """``frame`` with each row's source file (``SOURCE_FILE_COLUMN``, a URI as Spark reads it) as its
    index in ``names`` (``FILE_RANK_COLUMN``; sorted, so that ranks order files by name), joined by
    broadcast. A row keeps the URI itself only if its file is not among them, which Spark's own
    listing of what it reads (``DataFrame.inputFiles``) rules out."""
    # From Arrow, the JVM reads the table as it is; from a list of rows, a Python worker process
    # unpickles them, started for a job of its own (1.1 s of a nightly's ingest).
    ranks = frame.sparkSession.createDataFrame(
        pa.table(
            {
                FILE_RANK_COLUMN: pa.array(range(len(names)), pa.int32()),
                SOURCE_FILE_COLUMN: pa.array(names, pa.string()),
            }
        )
    )
    return frame.join(F.broadcast(ranks), SOURCE_FILE_COLUMN, "left").withColumn(
        SOURCE_FILE_COLUMN, F.when(F.col(FILE_RANK_COLUMN).isNull(), F.col(SOURCE_FILE_COLUMN))
    )


def ingest(
    raw: DataFrame,
    source: SourceConfig,
    events: EventsConfig,
    window_start: datetime,
    window_end: datetime,
    ingested_at: datetime,
    staging: Path,
    dates: Collection[date] | None = None,
    forgotten: tuple[bytes, frozenset[str]] | None = None,
) -> IngestResult:
    """Split source rows into good in-window events and quarantined records, with counts.

    ``forgotten`` (the erasure ledger's salt and user hashes) names users whose events are only
    counted, as ``events_erased_at_ingest`` (see :func:`erase_forgotten`).

    Rows whose timestamp parses but falls outside [window_start, window_end), or on a date not in
    ``dates`` (when given), belong to another run or stay as the lake has them, and are only counted.
    A broken record's timestamp cannot be trusted (a shifted column puts anything there), so it is
    quarantined whatever its timestamp says.

    The classified rows are written once to ``staging`` (Parquet by date; a date holding copies is
    rewritten once more, :func:`mark_duplicates`) and everything else reads them from there: held in
    memory instead, a production window spills and runs the JVM out of heap. The caller removes
    ``staging`` once the returned frames are written.
    """
    canonical = canonicalize(raw, source, events, ingested_at)
    if forgotten is not None:
        canonical = erase_forgotten(canonical, *forgotten)
    names = sorted(raw.inputFiles())
    canonical = with_file_ranks(canonical, names)
    in_window = (F.col("event_ts") >= F.lit(window_start)) & (F.col("event_ts") < F.lit(window_end))
    if dates is not None:
        in_window = in_window & utc_date(F.col("event_ts")).isin(sorted(dates))
    flagged = F.col("corrupt") | F.col("reason").isin("before_floor", "future_timestamp", ERASED)
    # Rows of other windows are staged too, under a reason of their own and without their record:
    # one aggregate over the staged rows then accounts for every row read, where counting them apart
    # read the source a second time.
    outside = ~F.coalesce(F.col("event_ts").isNull() | in_window | flagged, F.lit(False))
    spark = raw.sparkSession
    dated = (
        canonical.withColumn("raw_record", F.when(~outside, F.col("raw_record")))
        .withColumn("reason", F.when(outside, F.lit(OUTSIDE_WINDOW)).otherwise(F.col("reason")))
        .withColumn("event_date", utc_date(F.col("event_ts")))
        .repartition("event_date")
    )
    # The one shuffle by date serves the date-partitioned write and the lake's layout (each date's
    # events come back from ``staging`` as one file), and then the deduplication: copies share a date.
    label_actions(spark, "ingest: classify and stage by date")
    (
        event_writer(
            dated.select(
                *EVENT_COLUMNS, "reason", "raw_record", SOURCE_FILE_COLUMN, FILE_RANK_COLUMN, "event_date"
            )
        )
        .mode("overwrite")
        .partitionBy("event_date")
        .parquet(str(staging))
    )
    mark_duplicates(staging, names)
    return account_with_spark(spark, staging, names)


def account_with_spark(spark: SparkSession, staging: Path, names: list[str]) -> IngestResult:
    """Where the rows staged in ``staging`` went, by one Spark aggregate over them (see :func:`account`)."""
    # With its schema given: files without a row stage nothing, and Spark cannot infer a schema from
    # no files.
    classified = spark.read.schema(STAGING_SCHEMA).parquet(str(staging))
    label_actions(spark, "ingest: account for the records by file, date and reason")
    groups = classified.groupBy(FILE_RANK_COLUMN, SOURCE_FILE_COLUMN, "event_date", "reason").agg(
        F.max("event_ts").alias("latest_event"), *content_sums()
    )
    return account([row.asDict() for row in groups.collect()], names)


def account(groups: Iterable[Mapping[str, Any]], names: list[str]) -> IngestResult:
    """The counts, files and date contents of staged rows from their (file, date, reason) groups,
    each with its file's rank (or URI), date, reason, ``events``, ``latest_event`` and, for accepted
    rows, the :func:`content_sums` halves: the groups are few against the rows, and the accepted
    ones' sums are what each date holds, for :func:`write_lake` to compare with the lake."""
    counts: dict[str | None, int] = {}
    rows: dict[str, int] = {}
    latest: dict[str, datetime | None] = {}
    filled: dict[str, set[date]] = {}
    contents: dict[date, DateContents] = {}
    for group in groups:
        rank = group[FILE_RANK_COLUMN]
        path = file_path(names[rank] if rank is not None else group[SOURCE_FILE_COLUMN])
        reason, day = group["reason"], group["event_date"]
        counts[reason] = counts.get(reason, 0) + group["events"]
        rows[path] = rows.get(path, 0) + group["events"]
        latest[path] = max(filter(None, (latest.get(path), _utc(group["latest_event"]))), default=None)
        if reason is None:
            filled.setdefault(path, set()).add(day)
            held = contents.get(day, (0, 0, 0))
            contents[day] = (
                held[0] + group["events"],
                held[1] + group["hash_high"],
                held[2] + group["hash_low"],
            )
    metrics = record_counts(sum(rows.values()), counts)
    files = {path: FileSummary(frozenset(filled.get(path, set())), latest[path]) for path in rows}
    return IngestResult(metrics, files, contents)


QUARANTINE_ARROW_SCHEMA = pa.schema(
    [
        ("raw_record", pa.string()),
        ("reason", pa.string()),
        ("event_ts", pa.timestamp("us", tz="UTC")),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
    ]
)


def write_quarantine(staging: Path | None, target: Path) -> int:
    """The quarantined rows :func:`ingest` staged (every reason but those only counted) as the folder
    ``target``, swapped in whole; return how many. Read by Arrow, row groups without a quarantined
    row skipped by their statistics: a Spark job for the few rows of a usual run cost more than
    they do. ``staging`` None or empty writes an empty table of the quarantine's schema."""
    quarantined = 0
    with atomic_dir(target) as folder:
        folder.mkdir()
        with pq.ParquetWriter(folder / "part-00000.parquet", QUARANTINE_ARROW_SCHEMA) as writer:
            files = sorted(staging.glob("event_date=*/*.parquet")) if staging is not None else []
            if files:
                reason = ds.field("reason")
                scanner = ds.dataset([str(path) for path in files], format="parquet").scanner(
                    columns=QUARANTINE_ARROW_SCHEMA.names,
                    filter=reason.is_valid() & ~reason.isin(list(COUNTED_ONLY)),
                )
                for batch in scanner.to_batches():
                    if batch.num_rows:
                        writer.write_table(pa.Table.from_batches([batch]).cast(QUARANTINE_ARROW_SCHEMA))
                        quarantined += batch.num_rows
    return quarantined


def record_counts(total_rows: int, counts: Mapping[str | None, int]) -> dict[str, float]:
    """Where the records read went: ``counts`` per quarantine reason (or ``erased``, or
    ``outside_window``), accepted ones under None."""
    accepted, erased = counts.get(None, 0), counts.get(ERASED, 0)
    quarantined = sum(
        count for reason, count in counts.items() if reason is not None and reason not in COUNTED_ONLY
    )
    metrics: dict[str, float] = {
        "events_read": float(total_rows),
        "events_ingested": float(accepted),
        "events_quarantined": float(quarantined),
        "events_erased_at_ingest": float(erased),
        "events_outside_window": float(total_rows - accepted - quarantined - erased),
        "quarantine_share": quarantined / max(accepted + quarantined, 1),
    }
    metrics.update({f"quarantine_{reason}": float(counts.get(reason, 0)) for reason in QUARANTINE_REASONS})
    return metrics


def _utc(moment: datetime | None) -> datetime | None:
    """Spark hands timestamps back as naive local times of the session's zone, which is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def check_quarantine_share(metrics: dict[str, float], max_share: float) -> None:
    share = metrics["quarantine_share"]
    if share <= max_share:
        return
    top = sorted(
        (
            (name.removeprefix("quarantine_"), count)
            for name, count in metrics.items()
            if name.removeprefix("quarantine_") in QUARANTINE_REASONS and count > 0
        ),
        key=lambda pair: -pair[1],
    )[:3]
    reasons = ", ".join(f"{reason} ({int(count)})" for reason, count in top)
    raise QuarantineThresholdError(
        f"{share:.1%} of records were quarantined, above the limit of {max_share:.1%}; top reasons: {reasons}"
    )


def write_lake(
    staging: Path,
    incoming: Mapping[date, DateContents],
    lake: Path,
    window_start: datetime,
    window_end: datetime,
    dates: Collection[date] | None = None,
) -> set[date]:
    """Replace the lake's ``dates`` (default: every date the window wholly covers) with the accepted
    events :func:`ingest` staged in ``staging`` (holding ``incoming`` per date, :func:`account`);
    return the dates left as they were because the staged events are
    exactly what the lake has for them.

    Each staged date replaces the lake's folder of that date (:func:`copy_accepted`); dates to replace
    that no longer have events are removed too, so a re-ingest of a shrunken source leaves no stale
    rows behind. Dates the window only partly covers are never removed. A date whose events are the
    lake's (the same count and sums of event hashes) keeps its files, and with them its events'
    first ``ingested_at``: a full run re-reading a night's file then leaves the pair history built
    over that day valid (:func:`lake_signature`).
    """
    stored = lake_partitions(lake)
    overlapping = sorted(day for day in incoming if day in stored)
    unchanged: set[date] = set()
    if overlapping:

        def holds_incoming(day: date) -> bool:
            # The count from the files' footers first: only a date that may be unchanged is hashed.
            dataset = ds.dataset(str(stored[day]), format="parquet")
            return dataset.count_rows() == incoming[day][0] and lake_date_contents(dataset) == incoming[day]

        with ThreadPoolExecutor(max_workers=max(1, min(pa.cpu_count(), len(overlapping)))) as pool:
            unchanged = {day for day, same in zip(overlapping, pool.map(holds_incoming, overlapping)) if same}
    replaced = sorted(set(incoming) - unchanged)
    with ThreadPoolExecutor(max_workers=max(1, min(pa.cpu_count(), len(replaced)))) as pool:
        list(
            pool.map(
                lambda day: copy_accepted(staging / partition_name(day), lake / partition_name(day)), replaced
            )
        )
    for day, partition in lake_partitions(lake).items():
        start_of_day = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if (
            day not in incoming
            and (dates is None or day in dates)
            and window_start <= start_of_day
            and start_of_day + timedelta(days=1) <= window_end
        ):
            shutil.rmtree(partition)
    return unchanged


# The lake's files, as Spark reads them back with LAKE_SCHEMA's types (the date is the folder's).
LAKE_ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("value", pa.float64()),
        ("event_ts", pa.timestamp("us", tz="UTC")),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
    ]
)
# Rows a copy holds at once (one row group of the lake's file each): about 100 MB of staged columns.
COPY_BATCH_ROWS = 1 << 20


def copy_accepted(staged: Path, target: Path) -> None:
    """The accepted events of one staged date (its files under ``staged``) as the lake's folder
    ``target``, swapped in whole (:func:`~recsys_pipeline.files.atomic_dir`).

    Copied by Arrow, batch by batch, rather than by a Spark job reading staging back: Spark's Parquet
    writer took 14.3 s of a first weekly's 20M events (25.9 s of task time), Arrow 3.8 s. As Spark
    wrote them, ids are written without dictionary encoding, which a day's hundreds of thousands of
    distinct users defeat, and each date's rows keep the order ingest staged them in.
    """
    with atomic_dir(target) as folder:
        folder.mkdir()
        for number, path in enumerate(sorted(staged.glob("*.parquet"))):
            writer: pq.ParquetWriter | None = None
            for batch in pq.ParquetFile(path).iter_batches(
                batch_size=COPY_BATCH_ROWS, columns=[*LAKE_ARROW_SCHEMA.names, "reason"]
            ):
                accepted = pa.Table.from_batches([batch]).filter(pc.is_null(batch.column("reason")))
                if accepted.num_rows == 0:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(
                        folder / f"part-{number:05d}.parquet",
                        LAKE_ARROW_SCHEMA,
                        use_dictionary=["event_type", "source"],
                    )
                writer.write_table(accepted.select(LAKE_ARROW_SCHEMA.names).cast(LAKE_ARROW_SCHEMA))
            if writer is not None:
                writer.close()


# The staged rows a file buffers before it writes them out as a row group. Each task writes its dates'
# files at once (``spark.sql.maxConcurrentOutputFileWriters`` of them at most, conf/pipeline.yaml),
# each holding its row group in memory: this bounds what they hold together.
STAGED_ROW_GROUP_BYTES = 32 << 20
# Staged files live for one run; compressing them costs time, and in Spark every open file's Snappy
# compressors hold buffers outside the JVM's heap.
STAGED_COMPRESSION = "none"


def event_writer(events: DataFrame) -> DataFrameWriter:
    """ingest's Parquet writer for millions of staged events: ids are written without dictionary
    encoding, tried on every row and given up by a day's hundreds of thousands of distinct users
    (Spark wrote 20M events in 13.4 s instead of 17.0 s; the files are 10% larger and read no slower);
    row groups of :data:`STAGED_ROW_GROUP_BYTES`, not compressed (:data:`STAGED_COMPRESSION`: a
    20M-event first weekly's ingest took 45.4-45.8 s against 48.9-50.5 with Snappy, its Spark job
    peaked 80-160 MB lower)."""
    writer = events.write.option("parquet.block.size", str(STAGED_ROW_GROUP_BYTES))
    writer = writer.option("compression", STAGED_COMPRESSION)
    for column in ("user_id", "item_id"):
        writer = writer.option(f"parquet.enable.dictionary#{column}", "false")
    return writer


def hash_sums(*columns: str) -> list[Column]:
    """A group's event count and the sums of the halves of its events' 64-bit hashes over
    ``columns``: equal for the same events however they are cut into files or groups."""
    event_hash = F.xxhash64(*columns)
    return [
        F.count("*").alias("events"),
        # Summed as two 32-bit halves: long sums cannot overflow below 2^31 events and are far
        # cheaper than decimal arithmetic.
        F.sum(F.shiftrightunsigned(event_hash, 32)).alias("hash_high"),
        F.sum(event_hash.bitwiseAND(F.lit(0xFFFFFFFF))).alias("hash_low"),
    ]


# What a date's contents are summed over: every lake column but ``ingested_at``.
CONTENT_COLUMNS = ["user_id", "item_id", "event_type", "value", "event_ts", "source"]


def content_sums() -> list[Column]:
    """:func:`hash_sums` over :data:`CONTENT_COLUMNS`."""
    return hash_sums(*CONTENT_COLUMNS)


def lake_date_contents(dataset: ds.Dataset) -> DateContents:
    """The count and :func:`content_sums` of one lake date's events (its files as a dataset), by
    Arrow a batch at a time: the sums Spark adds up (:mod:`recsys_pipeline.hashing`), without a
    Spark job."""
    events, high, low = 0, 0, 0
    for batch in dataset.to_batches(columns=CONTENT_COLUMNS):
        batch_events, batch_high, batch_low = hash_sums_of([batch.column(name) for name in CONTENT_COLUMNS])
        events, high, low = events + batch_events, high + batch_high, low + batch_low
    return events, high, low


def lake_signature(lake: Path, before: date) -> str:
    """sha256 over the name, size and modification time of every lake file dated before ``before``:
    it changes whenever an ingest rewrites any of those days (a re-ingest replaces a date's files)."""
    files = sorted(
        (str(path.relative_to(lake)), path.stat().st_size, path.stat().st_mtime_ns)
        for day, partition in lake_partitions(lake).items()
        if day < before
        for path in partition.rglob("*")
        if path.is_file()
    )
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def lake_partitions(lake: Path) -> dict[date, Path]:
    """The lake's date partitions by date (not a folder being swapped in: its name starts with ".")."""
    return {
        date.fromisoformat(partition.name.removeprefix("event_date=")): partition
        for partition in lake.glob("event_date=*")
    }


def restore_lake(lake: Path) -> None:
    """Undo what a crash in the middle of a date's copy (:func:`copy_accepted`) left: a date set
    aside with no new one in its place comes back, any other set aside is removed, and so is a copy
    never swapped in. Called under the state lock before the lake is read or rewritten, so that no
    run misses a date and no erasure misses a file."""
    for name in {aside.name[1:].split(".old-")[0] for aside in lake.glob(".event_date=*.old-*")}:
        restore_set_aside(lake / name)
    for unfinished in lake.glob(".event_date=*.tmp-*"):
        shutil.rmtree(unfinished)


def partition_name(day: date) -> str:
    return f"event_date={day.isoformat()}"


def lake_partitions_between(lake: Path, start: datetime, end: datetime) -> list[Path]:
    """The date folders that can hold events with start <= event_ts < end, by date."""
    return [
        partition
        for day, partition in sorted(lake_partitions(lake).items())
        if start.date() <= day <= end.date()
    ]


def read_lake(spark: SparkSession, lake: Path, start: datetime, end: datetime) -> DataFrame:
    """Events with start <= event_ts < end, from the date partitions the range touches only: a night
    lists one partition, not the lake's whole history."""
    paths = [str(partition) for partition in lake_partitions_between(lake, start, end)]
    if not paths:
        return spark.createDataFrame([], LAKE_SCHEMA)
    frame = spark.read.option("basePath", str(lake)).parquet(*paths)
    return frame.where((F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end)))


def count_lake_events(lake: Path, start: datetime, end: datetime) -> int:
    """How many events :func:`read_lake` returns, counted by Arrow from the date folders the range
    touches, row groups wholly inside the range from their statistics. As a Spark job the count took
    0.28 s of a 20M-event bench's nightly and 0.32-0.40 s of its weeklies, planning aside."""
    in_window = lake_window(start, end)
    return sum(
        ds.dataset(str(partition), format="parquet").count_rows(filter=in_window)
        for partition in lake_partitions_between(lake, start, end)
    )


def lake_window(start: datetime, end: datetime) -> ds.Expression:
    """:func:`read_lake`'s filter for Arrow reading the lake's files: start <= event_ts < end."""
    event_ts = ds.field("event_ts")
    return (event_ts >= pa.scalar(start, pa.timestamp("us", tz="UTC"))) & (
        event_ts < pa.scalar(end, pa.timestamp("us", tz="UTC"))
    )


def history_window(run: RunContext) -> tuple[datetime, datetime]:
    """The events a model learns from: back to the configured history (or the floor), up to the end."""
    history = run.config.interactions.history_days
    start = run.interval_end - timedelta(days=history) if history else run.config.events.min_event_time
    return min(start.replace(tzinfo=run.interval_end.tzinfo), run.interval_start), run.interval_end


def ingest_window(run: RunContext) -> tuple[datetime, datetime]:
    """A full run re-ingests the history (so late or corrected records land); a refresh its interval."""
    if run.mode == "refresh":
        return run.interval_start, run.interval_end
    return history_window(run)
