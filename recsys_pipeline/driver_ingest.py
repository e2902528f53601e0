"""Ingest on the driver: a Parquet source's few rows (a night's, a week's) classified and staged by
Arrow, as :func:`recsys_pipeline.events.ingest` does with Spark.

A Spark application's fixed part (the JVM, the first job reading the source's schema, planning, tasks
run cold) cost more than the work for a night's 350k events: 9.1 s of a 20M-event bench's nightly
ingest, where Arrow classifies them in under a second. Both write the same staging (rows by date,
the columns of ``STAGING_SCHEMA``), so that everything after it (:func:`events.mark_duplicates`,
:func:`events.account_for_staged`, the lake's copy, the quarantine) is one code; the tests in
``tests/test_driver_ingest.py`` run both over the same sources and compare what each stages.

Only sources whose records Spark and Arrow read alike come here (:func:`driver_source`): Parquet
files of one schema of strings, integers and doubles, a numeric timestamp, and partition folders
whose values Spark would give back as the folder names them. Text that Spark parses (a value or
a timestamp written as text, a timestamp by ``timestamp_format``) and CSV's corrupt-record rules
stay Spark's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_pipeline.config import EventsConfig, SourceConfig
from recsys_pipeline.events import (
    CONTENT_COLUMNS,
    CONTROL_CHARACTERS,
    ERASED,
    FILE_RANK_COLUMN,
    OUTSIDE_WINDOW,
    SOURCE_FILE_COLUMN,
    IngestResult,
    account,
    mark_duplicates,
    partition_name,
)
from recsys_pipeline.hashing import spark_xxhash64

MICROS_PER_DAY = 86_400_000_000
# Partition values Spark's type inference hands back as the same text: dates, integers written as
# integers, and names (Spark would read 1.50 as the double 1.5, 2024-01-01 10:00 as a timestamp).
VERBATIM_PARTITION_VALUE = re.compile(r"\d{4}-\d{2}-\d{2}|0|-?[1-9]\d{0,17}|[A-Za-z_][A-Za-z0-9_-]*")
SPARK_DOUBLE_WORDS = {"nan", "infinity", "inf"}
# Staged rows that are no lake event sit under Spark's folder for a null date: only their reason and
# file count, and Spark would stage a quarantined row's date only to account for it.
NO_DATE_FOLDER = "event_date=__HIVE_DEFAULT_PARTITION__"
STAGING_ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("value", pa.float64()),
        ("event_ts", pa.timestamp("us", tz="UTC")),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("raw_record", pa.string()),
        (SOURCE_FILE_COLUMN, pa.string()),
        (FILE_RANK_COLUMN, pa.int32()),
    ]
)
LONG_LIMIT = float(2**63)
# Jackson (Spark's to_json) escapes quotes, backslashes and C0 controls, these by name, the rest as
# \u00XX in upper case.
JSON_ESCAPES = {code: f"\\u{code:04X}" for code in range(0x20)} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
}


@dataclass(frozen=True)
class DriverSource:
    """A Parquet source the driver reads as Spark would: its files by rank, each file's partition
    values (as text, by name), and how many rows they hold."""

    files: list[str]
    partitions: list[dict[str, str]]
    schema: pa.Schema
    rows: int


def driver_source(source: SourceConfig, files: Sequence[str], max_rows: int) -> DriverSource | None:
    """``files`` of ``source`` (local paths) as the driver reads them, or None when Spark must: not
    Parquet, more than ``max_rows`` rows, files of different schemas, a column or partition value
    whose text Spark writes otherwise, or a value or timestamp that is text for Spark to parse."""
    if source.format != "parquet" or source.timestamp_unit == "format" or not files:
        return None
    if any(character in str(source.path) for character in "*?["):
        return None  # Spark's partition discovery under a pattern is its own
    schemas, rows = [], 0
    for path in files:
        metadata = pq.read_metadata(path)
        rows += metadata.num_rows
        if rows > max_rows:
            return None
        schemas.append(metadata.schema.to_arrow_schema().remove_metadata())
    schema = schemas[0]
    if any(not other.equals(schema) for other in schemas[1:]):
        return None
    text_allowed = {"user_id", "item_id", "event_type"}
    for field in schema:
        mapped_as = {canonical for canonical, name in source.mapping.items() if name == field.name}
        integral = pa.types.is_signed_integer(field.type)
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            if mapped_as - text_allowed:
                return None
        elif not (integral or (pa.types.is_float64(field.type) and not mapped_as & text_allowed)):
            return None
    partitions = [partition_values(source.path, Path(path)) for path in files]
    if any(values is None for values in partitions):
        return None
    names = {tuple(values) for values in partitions if values is not None}
    if len(names) != 1 or set(next(iter(names))) & set(schema.names):
        return None
    ranked = sorted(zip(files, partitions, strict=True), key=lambda pair: Path(pair[0]).as_uri())
    return DriverSource(
        [path for path, _ in ranked], [values for _, values in ranked if values is not None], schema, rows
    )


def partition_values(root: Path, path: Path) -> dict[str, str] | None:
    """The ``name=value`` folders between ``root`` (a folder source) and ``path``, or None when a
    folder is not one or Spark would read its value as something other than its text."""
    if not root.is_dir():
        return {}
    values: dict[str, str] = {}
    for folder in path.relative_to(root.resolve() if path.is_absolute() else root).parts[:-1]:
        name, equals, value = folder.partition("=")
        if not equals or not VERBATIM_PARTITION_VALUE.fullmatch(value) or value.lower() in SPARK_DOUBLE_WORDS:
            return None
        values[name] = value
    return values


def java_double_text(number: float) -> str:
    """A double as Spark casts it to text (Java's ``Double.toString``): plain from 1e-3 to 1e7,
    else ``d.dddE<exponent>``, with the shortest digits that read back as the number (Java 17 may
    print more digits for a few doubles)."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number == 0:
        return "-0.0" if math.copysign(1.0, number) < 0 else "0.0"
    if 1e-3 <= abs(number) < 1e7:
        return repr(number)
    sign, digits, exponent = Decimal(repr(number)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    scale = len(digits) - 1 + int(exponent)
    return f"{'-' if sign else ''}{text[0]}.{text[1:] or '0'}E{scale}"


def _text(column: pa.ChunkedArray) -> pa.Array:
    """A source column as the text Spark's ``cast(... as string)`` gives its values."""
    array = column.combine_chunks()
    if pa.types.is_floating(array.type):
        return pa.array(
            [None if value is None else java_double_text(value) for value in array.to_pylist()], pa.string()
        )
    return array.cast(pa.string())


def _json_text(value: str) -> str:
    return f'"{value.translate(JSON_ESCAPES)}"'


def source_records(rows: pa.Table) -> list[str]:
    """Source rows as Spark's ``to_json`` of their columns' text: fields in column order, null ones
    left out."""
    texts = {name: _text(rows.column(name)).to_pylist() for name in rows.column_names}
    keys = {name: _json_text(name) for name in rows.column_names}
    return [
        "{"
        + ",".join(
            f"{keys[name]}:{_json_text(values[row])}"
            for name, values in texts.items()
            if values[row] is not None
        )
        + "}"
        for row in range(rows.num_rows)
    ]


def _mask(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean array as NumPy, null as False (Spark's ``when`` takes a null condition as false)."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def _lower(values: pa.Array) -> pa.Array:
    """Spark's ``lower``: Java's full Unicode case mapping (Python's ``str.lower`` is the same), over
    the distinct values."""
    distinct = pc.unique(values)
    lowered = pa.array(
        [None if value is None else value.lower() for value in distinct.to_pylist()], pa.string()
    )
    return lowered.take(pc.index_in(values, value_set=distinct))


def _timestamps(number: np.ndarray, present: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Spark's numeric timestamp: micros = try_cast(number / scale * 1e6 as long), null for NaN or
    beyond a long (a long's limit as a double, 2^63, saturates as Java's cast does)."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    with np.errstate(invalid="ignore", over="ignore"):
        micros = number / scale * 1e6
        valid = present & (np.floor(micros) <= LONG_LIMIT) & (np.ceil(micros) >= -LONG_LIMIT)
        clipped = np.clip(np.where(valid, micros, 0.0), -LONG_LIMIT, np.nextafter(LONG_LIMIT, 0.0))
    whole = np.trunc(clipped).astype(np.int64)
    whole[valid & (micros >= LONG_LIMIT)] = np.iinfo(np.int64).max
    return whole, valid


def classify(
    table: pa.Table,
    rank: int,
    source: SourceConfig,
    events: EventsConfig,
    window_start: datetime,
    window_end: datetime,
    ingested_at: datetime,
    dates: Collection[date] | None,
    forgotten: tuple[bytes, frozenset[str]] | None,
) -> tuple[pa.Table, np.ndarray]:
    """One source file's rows (partition columns as text) as staged rows (``STAGING_ARROW_SCHEMA``),
    with each row's UTC day number (meaningful where the row is a lake event): the reasons of
    :func:`events.canonicalize` in its order, erasure, and the window as :func:`events.ingest` applies
    them."""
    rows = table.num_rows
    column = {field: table.column(name) for field, name in source.mapping.items() if name}
    user_id = pc.utf8_trim(_text(column["user_id"]), " ")
    item_id = pc.utf8_trim(_text(column["item_id"]), " ")
    if "event_type" in column:
        event_type = _lower(pc.utf8_trim(_text(column["event_type"]), " "))
    else:
        event_type = pa.array([source.default_event_type] * rows, pa.string())
    if "value" in column:
        value = column["value"].combine_chunks().cast(pa.float64(), safe=False)
    else:
        value = pa.nulls(rows, pa.float64())
    number = column["timestamp"].combine_chunks().cast(pa.float64(), safe=False)
    number_present = _mask(pc.is_valid(number)) & ~_mask(pc.is_nan(number))
    micros, has_time = _timestamps(
        number.fill_null(0.0).to_numpy(zero_copy_only=False), number_present, source.timestamp_unit
    )

    missing_user = _mask(pc.or_kleene(pc.is_null(user_id), pc.equal(user_id, "")))
    missing_item = _mask(pc.or_kleene(pc.is_null(item_id), pc.equal(item_id, "")))
    invalid_id = (
        _mask(pc.greater(pc.utf8_length(user_id), events.max_id_length))
        | _mask(pc.greater(pc.utf8_length(item_id), events.max_id_length))
        | _mask(
            pc.match_substring_regex(pc.binary_join_element_wise(user_id, item_id, ""), CONTROL_CHARACTERS)
        )
    )
    unknown_type = ~_mask(pc.is_in(event_type, value_set=pa.array(events.event_types, pa.string())))
    numbers = value.fill_null(0.0).to_numpy(zero_copy_only=False)
    value_present = _mask(pc.is_valid(value))
    bad_value = value_present & (np.isnan(numbers) | (numbers < 0) | np.isinf(numbers))
    floor = int(pa.scalar(events.min_event_time, pa.timestamp("us", tz="UTC")).value)
    now = int(pa.scalar(ingested_at, pa.timestamp("us", tz="UTC")).value)
    reason = np.select(
        [
            missing_user,
            missing_item,
            invalid_id,
            unknown_type,
            bad_value,
            ~has_time & number_present,
            ~has_time,
            has_time & (micros < floor),
            has_time & (micros > now),
        ],
        [
            "missing_user_id",
            "missing_item_id",
            "invalid_id",
            "unknown_event_type",
            "invalid_value",
            "invalid_timestamp",
            "unparseable_timestamp",
            "before_floor",
            "future_timestamp",
        ],
        default="",
    ).astype(object)
    erased = np.zeros(rows, dtype=bool)
    if forgotten is not None:
        salt, user_hashes = forgotten
        distinct = pc.unique(user_id).drop_null().to_pylist()
        hits = [user for user in distinct if hashlib.sha256(salt + user.encode()).hexdigest() in user_hashes]
        erased = _mask(pc.is_in(user_id, value_set=pa.array(hits, pa.string())))
        reason[erased] = ERASED
        has_time = has_time & ~erased
    day = np.floor_divide(micros, MICROS_PER_DAY)
    start = int(pa.scalar(window_start, pa.timestamp("us", tz="UTC")).value)
    end = int(pa.scalar(window_end, pa.timestamp("us", tz="UTC")).value)
    in_window = (micros >= start) & (micros < end)
    if dates is not None:
        in_window &= np.isin(day, [(chosen - date(1970, 1, 1)).days for chosen in dates])
    flagged = np.isin(reason, ["before_floor", "future_timestamp", ERASED])
    outside = has_time & ~in_window & ~flagged
    reason[outside] = OUTSIDE_WINDOW
    quarantined = np.flatnonzero((reason != "") & ~outside & ~erased)
    records = np.full(rows, None, dtype=object)
    if len(quarantined):
        records[quarantined] = source_records(table.take(pa.array(quarantined)))
    kept = pa.array(~erased)
    staged = pa.table(
        {
            "user_id": pc.if_else(kept, user_id, None),
            "item_id": pc.if_else(kept, item_id, None),
            "event_type": pc.if_else(kept, event_type, None),
            "value": pc.if_else(kept, value, None),
            "event_ts": pa.array(micros, pa.int64(), mask=~has_time).cast(pa.timestamp("us", tz="UTC")),
            "ingested_at": pa.array(np.full(rows, now, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC")),
            "source": pa.array([source.name] * rows, pa.string()),
            "reason": pa.array(reason, pa.string(), mask=reason == ""),
            "raw_record": pa.array(records, pa.string()),
            SOURCE_FILE_COLUMN: pa.nulls(rows, pa.string()),
            FILE_RANK_COLUMN: pa.array(np.full(rows, rank, dtype=np.int32)),
        },
        schema=STAGING_ARROW_SCHEMA,
    )
    return staged, day


def ingest_on_driver(
    found: DriverSource,
    source: SourceConfig,
    events: EventsConfig,
    window_start: datetime,
    window_end: datetime,
    ingested_at: datetime,
    staging: Path,
    dates: Collection[date] | None = None,
    forgotten: tuple[bytes, frozenset[str]] | None = None,
) -> IngestResult:
    """:func:`events.ingest` for a source :func:`driver_source` found: the same reasons, window,
    erasure, staging by date, duplicates and account, without Spark."""
    by_date: dict[int, list[pa.Table]] = {}
    undated: list[pa.Table] = []
    for rank, (path, partition) in enumerate(zip(found.files, found.partitions, strict=True)):
        table = pq.read_table(path)
        for name, value in partition.items():
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
        staged, day = classify(
            table, rank, source, events, window_start, window_end, ingested_at, dates, forgotten
        )
        lake_event = _mask(pc.is_null(staged.column("reason")))
        undated.append(staged.filter(pa.array(~lake_event)))
        for number in np.unique(day[lake_event]):
            by_date.setdefault(int(number), []).append(staged.filter(pa.array(lake_event & (day == number))))
    staging.mkdir(parents=True, exist_ok=True)
    for number, parts in by_date.items():
        folder = staging / partition_name(date.fromordinal(date(1970, 1, 1).toordinal() + number))
        _write_staged(pa.concat_tables(parts), folder)
    _write_staged(pa.concat_tables(undated), staging / NO_DATE_FOLDER)
    mark_duplicates(staging, found.files)
    return account(staged_groups(staging), found.files)


def staged_groups(staging: Path) -> list[dict[str, Any]]:
    """The (file, date, reason) groups of the rows staged in ``staging`` with what :func:`account`
    reads of them: Spark's aggregate in :func:`events.account_with_spark`, by Arrow."""
    groups: list[dict[str, Any]] = []
    for folder in sorted(staging.glob("event_date=*")):
        files = sorted(folder.glob("*.parquet"))
        if not files:
            continue
        day = None if folder.name == NO_DATE_FOLDER else date.fromisoformat(folder.name.split("=", 1)[1])
        rows = pa.concat_tables(
            pq.read_table(path, columns=[*CONTENT_COLUMNS, "reason", FILE_RANK_COLUMN]) for path in files
        )
        hashes = spark_xxhash64([rows.column(name) for name in CONTENT_COLUMNS])
        rows = rows.append_column("hash_high", pa.array(hashes >> np.uint64(32))).append_column(
            "hash_low", pa.array(hashes & np.uint64(0xFFFFFFFF))
        )
        summed = rows.group_by([FILE_RANK_COLUMN, "reason"], use_threads=False).aggregate(
            [("event_ts", "max"), ([], "count_all"), ("hash_high", "sum"), ("hash_low", "sum")]
        )
        for group in summed.to_pylist():
            accepted = group["reason"] is None
            groups.append(
                {
                    FILE_RANK_COLUMN: group[FILE_RANK_COLUMN],
                    SOURCE_FILE_COLUMN: None,
                    "event_date": day,
                    "reason": group["reason"],
                    "latest_event": group["event_ts_max"],
                    "events": group["count_all"],
                    "hash_high": int(group["hash_high_sum"]) if accepted else 0,
                    "hash_low": int(group["hash_low_sum"]) if accepted else 0,
                }
            )
    return groups


def _write_staged(table: pa.Table, folder: Path) -> None:
    if table.num_rows == 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        folder / "part-00000.parquet",
        compression="none",
        use_dictionary=["event_type", "source", "reason"],
    )
