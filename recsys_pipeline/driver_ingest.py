"""Ingest on the driver: a Parquet source's few rows (a night's, a week's) classified and staged by
Arrow, as :func:`recsys_pipeline.events.ingest` does with Spark.

A Spark application's fixed part (the JVM, the first job reading the source's schema, planning, tasks
run cold) cost more than the work for a night's 350k events: 9.1 s of a 20M-event bench's nightly
ingest, where Arrow classifies them in under a second. Both write the same staging (rows by date,
the columns of ``STAGING_SCHEMA``), so that everything after it (:func:`events.mark_duplicates`,
:func:`events.account`, the lake's copy, the quarantine) is one code; the tests in
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
import os
import re
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    ERASED,
    FILE_RANK_COLUMN,
    LAKE_ARROW_SCHEMA,
    OUTSIDE_WINDOW,
    SOURCE_FILE_COLUMN,
    IngestResult,
    account,
    mark_duplicates,
    partition_name,
)
from recsys_pipeline.hashing import spark_xxhash64, utf8_bytes

MICROS_PER_DAY = 86_400_000_000
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
# Partition values Spark's type inference hands back as the same text: dates, integers written as
# integers, and names (Spark would read 1.50 as the double 1.5, 2024-01-01 10:00 as a timestamp).
VERBATIM_PARTITION_VALUE = re.compile(r"\d{4}-\d{2}-\d{2}|0|-?[1-9]\d{0,17}|[A-Za-z_][A-Za-z0-9_-]*")
SPARK_DOUBLE_WORDS = {"nan", "infinity", "inf"}
# Staged rows that are no lake event sit under Spark's folder for a null date: only their reason and
# file count, and Spark would stage a quarantined row's date only to account for it.
NO_DATE_FOLDER = "event_date=__HIVE_DEFAULT_PARTITION__"
# The staged rows as Spark stages them (STAGING_SCHEMA): the lake's columns, the quarantine's, the file.
STAGING_ARROW_SCHEMA = pa.schema(
    [
        *LAKE_ARROW_SCHEMA,
        pa.field("reason", pa.string()),
        pa.field("raw_record", pa.string()),
        pa.field(SOURCE_FILE_COLUMN, pa.string()),
        pa.field(FILE_RANK_COLUMN, pa.int32()),
    ]
)
LONG_LIMIT = float(2**63)
# The reasons classify gives, in the order canonicalize checks them (unparseable_record is CSV's,
# duplicate comes later); each row's is its code in REASONS, 0 for none.
CLASSIFIED_REASONS = [
    "missing_user_id",
    "missing_item_id",
    "invalid_id",
    "unknown_event_type",
    "invalid_value",
    "invalid_timestamp",
    "unparseable_timestamp",
    "before_floor",
    "future_timestamp",
]
REASONS = ["", *CLASSIFIED_REASONS, ERASED, OUTSIDE_WINDOW]
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
    # As source_files names the files: absolute, '.' and '..' resolved, links kept.
    for folder in path.relative_to(os.path.normpath(os.path.abspath(root))).parts[:-1]:
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


def control_characters(values: pa.Array) -> np.ndarray:
    """Whether each string holds a C0 or C1 control character or DEL (``CONTROL_CHARACTERS``, which
    Spark searches for by regex), from its UTF-8 bytes: C0 and DEL are one byte each, a C1 character
    is 0xC2 then 0x80-0x9F. A tenth of the time RE2 takes over a week's ids."""
    offsets, data = utf8_bytes(values)
    control = (data < 0x20) | (data == 0x7F)
    control[:-1] |= (data[:-1] == 0xC2) & (data[1:] >= 0x80) & (data[1:] <= 0x9F)
    found = np.concatenate([[0], np.cumsum(control, dtype=np.int64)])
    return found[offsets[1:]] > found[offsets[:-1]]


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
        event_type = pa.repeat(pa.scalar(source.default_event_type, pa.string()), rows)
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
        | control_characters(user_id)
        | control_characters(item_id)
    )
    unknown_type = ~_mask(pc.is_in(event_type, value_set=pa.array(events.event_types, pa.string())))
    numbers = value.fill_null(0.0).to_numpy(zero_copy_only=False)
    value_present = _mask(pc.is_valid(value))
    bad_value = value_present & (np.isnan(numbers) | (numbers < 0) | np.isinf(numbers))
    floor = int(pa.scalar(events.min_event_time, pa.timestamp("us", tz="UTC")).value)
    now = int(pa.scalar(ingested_at, pa.timestamp("us", tz="UTC")).value)
    # Each row's reason as its code in REASONS (0: none), in canonicalize's order.
    code = np.select(
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
        [REASONS.index(reason) for reason in CLASSIFIED_REASONS],
        default=0,
    ).astype(np.int8)
    erased = np.zeros(rows, dtype=bool)
    if forgotten is not None:
        salt, user_hashes = forgotten
        distinct = pc.unique(user_id).drop_null().to_pylist()
        hits = [user for user in distinct if hashlib.sha256(salt + user.encode()).hexdigest() in user_hashes]
        erased = _mask(pc.is_in(user_id, value_set=pa.array(hits, pa.string())))
        code[erased] = REASONS.index(ERASED)
        has_time = has_time & ~erased
    day = np.floor_divide(micros, MICROS_PER_DAY)
    start = int(pa.scalar(window_start, pa.timestamp("us", tz="UTC")).value)
    end = int(pa.scalar(window_end, pa.timestamp("us", tz="UTC")).value)
    in_window = (micros >= start) & (micros < end)
    if dates is not None:
        in_window &= np.isin(day, [chosen.toordinal() - EPOCH_ORDINAL for chosen in dates])
    flagged = np.isin(
        code, [REASONS.index(reason) for reason in ("before_floor", "future_timestamp", ERASED)]
    )
    outside = has_time & ~in_window & ~flagged
    code[outside] = REASONS.index(OUTSIDE_WINDOW)
    quarantined = np.flatnonzero((code > 0) & ~outside & ~erased)
    # A record for the quarantined rows only, the others null: taken by position from their few.
    position = np.full(rows, -1, dtype=np.int64)
    position[quarantined] = np.arange(len(quarantined))
    records = pa.array(source_records(table.take(pa.array(quarantined))), pa.string()).take(
        pa.array(position, mask=position < 0)
    )
    kept = pa.array(~erased)
    staged = pa.table(
        {
            "user_id": pc.if_else(kept, user_id, None),
            "item_id": pc.if_else(kept, item_id, None),
            "event_type": pc.if_else(kept, event_type, None),
            "value": pc.if_else(kept, value, None),
            "event_ts": pa.array(micros, pa.int64(), mask=~has_time).cast(pa.timestamp("us", tz="UTC")),
            "ingested_at": pa.repeat(pa.scalar(ingested_at, pa.timestamp("us", tz="UTC")), rows),
            "source": pa.repeat(pa.scalar(source.name, pa.string()), rows),
            "reason": pa.DictionaryArray.from_arrays(
                pa.array(code, mask=code == 0), pa.array(REASONS, pa.string())
            ).cast(pa.string()),
            "raw_record": records,
            SOURCE_FILE_COLUMN: pa.nulls(rows, pa.string()),
            FILE_RANK_COLUMN: pa.repeat(pa.scalar(rank, pa.int32()), rows),
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

    def classified(ranked: tuple[int, tuple[str, dict[str, str]]]) -> tuple[pa.Table, np.ndarray]:
        rank, (path, partition) = ranked
        table = pq.read_table(path)
        for name, value in partition.items():
            table = table.append_column(name, pa.repeat(pa.scalar(value, pa.string()), table.num_rows))
        return classify(table, rank, source, events, window_start, window_end, ingested_at, dates, forgotten)

    by_date: dict[int, list[pa.Table]] = {}
    undated: list[pa.Table] = []
    # Files on threads of their own: Arrow's kernels and NumPy's let go of the interpreter's lock.
    with ThreadPoolExecutor(max_workers=pa.cpu_count()) as pool:
        for staged, day in pool.map(classified, enumerate(zip(found.files, found.partitions, strict=True))):
            lake_event = np.flatnonzero(_mask(pc.is_null(staged.column("reason"))))
            undated.append(staged.filter(pa.array(_mask(pc.is_valid(staged.column("reason"))))))
            # The lake's events by date: one stable sort, then a slice per date.
            order = lake_event[np.argsort(day[lake_event], kind="stable")]
            ordered = staged.take(pa.array(order))
            days, first = np.unique(day[order], return_index=True)
            bounds = np.append(first, len(order))
            for number, begin, stop in zip(days, bounds[:-1], bounds[1:], strict=True):
                by_date.setdefault(int(number), []).append(ordered.slice(begin, stop - begin))
        staging.mkdir(parents=True, exist_ok=True)
        folders = {
            staging / partition_name(date.fromordinal(EPOCH_ORDINAL + number)): pa.concat_tables(parts)
            for number, parts in by_date.items()
        }
        folders[staging / NO_DATE_FOLDER] = pa.concat_tables(undated)
        list(pool.map(lambda folder: _write_staged(folders[folder], folder), folders))
    mark_duplicates(staging, found.files)
    return account(staged_groups(staging), found.files)


def staged_groups(staging: Path) -> list[dict[str, Any]]:
    """The (file, date, reason) groups of the rows staged in ``staging`` with what :func:`account`
    reads of them: Spark's aggregate in :func:`events.account_with_spark`, by Arrow."""
    with ThreadPoolExecutor(max_workers=pa.cpu_count()) as pool:
        return [
            group
            for groups in pool.map(_date_groups, sorted(staging.glob("event_date=*")))
            for group in groups
        ]


def _date_groups(folder: Path) -> list[dict[str, Any]]:
    """One staged folder's groups; only a date's rows are hashed (the rows without a date are no
    lake event, whose sums nothing reads)."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return []
    day = None if folder.name == NO_DATE_FOLDER else date.fromisoformat(folder.name.split("=", 1)[1])
    rows = pa.concat_tables(
        pq.read_table(path, columns=[*CONTENT_COLUMNS, "reason", FILE_RANK_COLUMN]) for path in files
    )
    if day is None:
        hashes = np.zeros(rows.num_rows, np.uint64)
    else:
        hashes = spark_xxhash64([rows.column(name) for name in CONTENT_COLUMNS])
    rows = rows.append_column("hash_high", pa.array(hashes >> np.uint64(32))).append_column(
        "hash_low", pa.array(hashes & np.uint64(0xFFFFFFFF))
    )
    summed = rows.group_by([FILE_RANK_COLUMN, "reason"], use_threads=False).aggregate(
        [("event_ts", "max"), ([], "count_all"), ("hash_high", "sum"), ("hash_low", "sum")]
    )
    return [
        {
            FILE_RANK_COLUMN: group[FILE_RANK_COLUMN],
            SOURCE_FILE_COLUMN: None,
            "event_date": day,
            "reason": group["reason"],
            "latest_event": group["event_ts_max"],
            "events": group["count_all"],
            "hash_high": int(group["hash_high_sum"]) if group["reason"] is None else 0,
            "hash_low": int(group["hash_low_sum"]) if group["reason"] is None else 0,
        }
        for group in summed.to_pylist()
    ]


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
