"""Build the user-item confidence matrix, its time-based holdout and stable ID maps (Spark, and
Arrow with NumPy for the passes over a written pair history and for the few events merged into it).

The stage that writes them (``stages.interactions``) produces::

    train/     Parquet (user_idx INT, item_idx INT, confidence FLOAT)   what the model learns from
    train_csr/ indptr.npy, indices.npy, data.npy                        the same matrix, as later
               stages load it (``tables.write_csr``)
    holdout/   Parquet (user_idx INT, item_idx INT, confidence FLOAT)   what evaluates it (``holdout``)
    maps/users, maps/items   Parquet (id STRING, idx INT)                snapshot of the ID maps used
    history/   Parquet (``HISTORY_SCHEMA``)    every pair's aggregate over the whole window, unfiltered,
               as of the window's end: what the next run carries forward instead of re-reading events
    recent/users, recent/items   Parquet (idx INT)                       active in the run's interval
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys_pipeline.config import HoldoutConfig, InteractionsConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.events import LAKE_ARROW_SCHEMA, hash_sums, lake_window
from recsys_pipeline.hashing import hash_sums_of
from recsys_pipeline.tables import (
    MATRIX_ARROW_SCHEMA,
    PAIR_FILE_COMPRESSION,
    count_rows,
    pair_batches,
    pair_tables,
)


class EmptyInteractionsError(RecsysError):
    """No usable interaction is left in the training window."""


class HoldoutTooSmallError(RecsysError):
    """The holdout has too few users for the evaluation gate to mean anything."""


ID_PAIR = ("user_id", "item_id")
INDEX_PAIR = ("user_idx", "item_idx")
HISTORY_SCHEMA = "user_idx INT, item_idx INT, confidence DOUBLE, event_ts TIMESTAMP"
# HISTORY_SCHEMA as Arrow writes it for Spark to read back.
HISTORY_ARROW_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.int32()),
        ("confidence", pa.float64()),
        ("event_ts", pa.timestamp("us", tz="UTC")),
    ]
)


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
            multiplier = value_multiplier(spec.value_map)
        elif spec.scale_by_value:
            multiplier = F.coalesce(F.col("value"), F.lit(0.0))
        expression = F.when(F.col("event_type") == event_type, F.lit(spec.weight) * multiplier).otherwise(
            expression
        )
    return expression


def value_multiplier(value_map: dict[float, float]) -> Column:
    """The multiplier of an event's value: the map's own where it has the value, linear between the
    two nearest mapped values otherwise, and the end value beyond either end.

    So a half-star 3.5 between ``3: 2`` and ``4: 3`` weighs 2.5, where an exact lookup would have
    given it 0 and dropped it. An event without a value weighs 0 (counted when its pair is dropped).
    """
    points = sorted(value_map.items())
    value = F.col("value")
    multiplier: Column = F.lit(float(points[-1][1]))
    for (low, low_weight), (high, high_weight) in reversed(list(zip(points, points[1:], strict=False))):
        slope = (high_weight - low_weight) / (high - low)
        multiplier = F.when(value <= high, F.lit(low_weight) + (value - F.lit(low)) * F.lit(slope)).otherwise(
            multiplier
        )
    multiplier = F.when(value <= points[0][0], F.lit(float(points[0][1]))).otherwise(multiplier)
    return F.when(value.isNull(), F.lit(0.0)).otherwise(multiplier)


def value_multipliers(values: np.ndarray, value_map: dict[float, float]) -> np.ndarray:
    """:func:`value_multiplier` in NumPy (NaN: no value), computed as Spark computes it."""
    points = sorted(value_map.items())
    multipliers = np.full(len(values), float(points[-1][1]))
    for (low, low_weight), (high, high_weight) in reversed(list(zip(points, points[1:], strict=False))):
        slope = (high_weight - low_weight) / (high - low)
        multipliers = np.where(values <= high, low_weight + (values - low) * slope, multipliers)
    multipliers = np.where(values <= points[0][0], float(points[0][1]), multipliers)
    return np.where(np.isnan(values), 0.0, multipliers)


def decayed(config: InteractionsConfig, as_of: Column) -> Column:
    """Per-event confidence, halved every ``half_life_days`` of age at ``as_of`` (if decay is on)."""
    confidence = confidence_expression(config)
    if not config.half_life_days:
        return confidence
    age_days = (F.unix_timestamp(as_of) - F.unix_timestamp("event_ts")) / 86400.0
    return confidence * F.pow(0.5, age_days / config.half_life_days)


def _combine(config: InteractionsConfig) -> Callable[[Column], Column]:
    return F.sum if config.aggregation == "sum" else F.max


class PairCounts:
    """Pairs counted as they pass each filter of :func:`supported`, without a pass of their own:
    Spark fills the counts in while the pairs are written (``DataFrame.observe``)."""

    def __init__(self, name: str):
        from pyspark.sql import Observation

        self.aggregated = Observation(f"{name}_aggregated")
        self.item_supported = Observation(f"{name}_item_supported")

    def dropped(self, kept: int) -> dict[str, float]:
        """Pairs dropped per reason, given how many were kept in the end (read after the write)."""
        # A sum over no rows is null: no pairs at all.
        aggregated = {name: value or 0 for name, value in self.aggregated.get.items()}
        return dropped_pairs(
            aggregated["pairs"], aggregated["zero_confidence"], self.item_supported.get["pairs"] or 0, kept
        )


def dropped_pairs(aggregated: int, zero_confidence: int, item_supported: int, kept: int) -> dict[str, float]:
    """Pairs dropped per reason by :func:`supported`'s filters, from how many pairs went in, how many
    weighed 0, how many passed the item support and how many were kept."""
    return {
        "pairs_aggregated": float(aggregated),
        "dropped_pairs_zero_confidence": float(zero_confidence),
        "dropped_pairs_min_item_support": float(aggregated - zero_confidence - item_supported),
        "dropped_pairs_min_user_support": float(item_supported - kept),
    }


def check_zero_confidence_share(dropped: dict[str, float], max_share: float) -> None:
    """Pairs whose events all weigh 0 are dropped; more than ``max_share`` of them is a config or
    feed problem (an unweighted event type, values missing), not something to train past."""
    share = dropped["dropped_pairs_zero_confidence"] / max(dropped["pairs_aggregated"], 1.0)
    if share > max_share:
        raise EmptyInteractionsError(
            f"{share:.1%} of (user, item) pairs have zero confidence and would be dropped, above "
            f"interactions.max_zero_confidence_share={max_share:.1%}: give their event types a weight "
            "in interactions.event_weights, or check that their values arrive"
        )


def supported(
    pairs: DataFrame,
    config: InteractionsConfig,
    keys: tuple[str, str] = ID_PAIR,
    counts: PairCounts | None = None,
) -> DataFrame:
    """Positive, capped (user, item, confidence) pairs that meet the min-support filters.

    The item filter reads ``pairs`` twice (its counts, then the pairs they keep): at volume, pass
    persisted pairs so that they are aggregated once.
    """
    user, item = keys
    positive = F.col("confidence") > 0
    kept = pairs
    if counts is not None:
        kept = kept.observe(
            counts.aggregated,
            F.count(F.lit(1)).alias("pairs"),
            F.sum(F.when(positive, 0).otherwise(1)).alias("zero_confidence"),
        )
    kept = kept.where(positive).withColumn(
        "confidence", F.least(F.col("confidence"), F.lit(config.max_confidence))
    )
    if config.min_item_interactions > 1:
        # The items' counts are a small aggregate joined back, where a window by item would shuffle
        # every pair. They come from ``pairs``, not ``kept``, so that each observation sits on one
        # branch of the plan only.
        item_support = (
            pairs.where(positive)
            .groupBy(item)
            .agg(F.count("*").alias("n"))
            .where(F.col("n") >= config.min_item_interactions)
            .select(item)
        )
        # Broadcast outright: planned as a sort-merge join (the support's size is unknown until it
        # runs), every pair would be shuffled by item before the plan could switch.
        kept = kept.join(F.broadcast(item_support), item, "left_semi")
    if counts is not None:
        kept = kept.observe(counts.item_supported, F.count(F.lit(1)).alias("pairs"))
    if config.min_user_interactions > 1:
        kept = (
            kept.withColumn("n", F.count("*").over(Window.partitionBy(user)))
            .where(F.col("n") >= config.min_user_interactions)
            .drop("n")
        )
    return kept


def write_history_matrices(
    history: Path,
    config: InteractionsConfig,
    shape: tuple[int, int],
    train: Path,
    holdout: Path,
    last_n: int | None,
    batch_rows: int = 1 << 20,
) -> dict[str, float]:
    """Write the matrices of a written pair history (``HISTORY_SCHEMA``, of ``shape`` users and items):
    into ``holdout`` each user's ``last_n`` latest pairs (:func:`pair_census`; none without
    ``last_n``), positive and capped, with no minimum support (an item or user too rare to train on
    is still one to evaluate on); into ``train`` the other pairs that pass :func:`supported`.
    Returns the pairs dropped per reason (:func:`dropped_pairs`).

    :func:`supported`'s filters, counted by NumPy over the files, ``batch_rows`` pairs at a time, in
    three passes (the held-out pairs with the items' support, the users' among the pairs it keeps
    where a user needs more than one, the write): memory holds a few numbers per user and per item.
    Spark took 4-5 s for a 20M-event history's training matrix, as its user support shuffled every
    pair by user.
    """
    n_users, n_items = shape
    census = pair_census(history, shape, last_n or 0, batch_rows)
    held_items = census.held

    def read() -> Iterator[tuple[pa.RecordBatch, np.ndarray, np.ndarray]]:
        """Each batch of pairs, with which of them train and which are positive."""
        for batch in pair_batches(history, [*INDEX_PAIR, "confidence"], batch_rows):
            users, items = batch.column("user_idx").to_numpy(), batch.column("item_idx").to_numpy()
            held = np.zeros(len(users), dtype=bool)
            for items_held in held_items:
                held |= items_held[users] == items
            yield batch, ~held, batch.column("confidence").to_numpy() > 0

    # Held-out pairs are positive ones: the training pairs' counts are the census's less theirs.
    held_out = held_items[held_items >= 0]
    aggregated = census.pairs - len(held_out)
    item_supported = (
        census.positive_per_item - np.bincount(held_out, minlength=n_items) >= config.min_item_interactions
    )
    # A user with a pair left has one: at a minimum of one, the users' pass would drop nothing.
    user_supported: np.ndarray | None = None
    item_supported_pairs: int | None = None
    if config.min_user_interactions > 1:
        per_user = np.zeros(n_users, dtype=np.int64)
        for batch, trains, positive in read():
            items = batch.column("item_idx").to_numpy()
            supported_pairs = trains & positive & item_supported[items]
            per_user += np.bincount(batch.column("user_idx").to_numpy()[supported_pairs], minlength=n_users)
        user_supported = per_user >= config.min_user_interactions
        item_supported_pairs = int(per_user.sum())
    kept = 0
    train.mkdir(parents=True)
    holdout.mkdir(parents=True)
    with ExitStack() as files:
        train_rows, holdout_rows = (
            files.enter_context(
                pq.ParquetWriter(
                    folder / "part-00000.parquet",
                    MATRIX_ARROW_SCHEMA,
                    use_dictionary=False,
                    compression=PAIR_FILE_COMPRESSION,
                )
            )
            for folder in (train, holdout)
        )
        for batch, trains, positive in read():
            users, items = batch.column("user_idx").to_numpy(), batch.column("item_idx").to_numpy()
            keep = trains & positive & item_supported[items]
            if user_supported is not None:
                keep &= user_supported[users]
            kept += int(keep.sum())
            train_rows.write_table(capped_rows(batch, keep, config.max_confidence))
            if last_n:
                holdout_rows.write_table(capped_rows(batch, ~trains & positive, config.max_confidence))
    if item_supported_pairs is None:
        item_supported_pairs = kept
    return dropped_pairs(aggregated, census.zero_confidence, item_supported_pairs, kept)


@dataclass(frozen=True)
class PairCensus:
    """What one pass over a pair history counts (:func:`pair_census`)."""

    held: np.ndarray  # (last_n x users): row r every user's (r + 1)-th latest positive item, or -1
    positive_per_item: np.ndarray  # pairs with a positive confidence, per item
    pairs: int
    zero_confidence: int  # pairs whose confidence is not positive


NO_TIME = np.iinfo(np.int64).min


def pair_census(history: Path, shape: tuple[int, int], last_n: int, batch_rows: int) -> PairCensus:
    """The items of each user's ``last_n`` most recent positive pairs (by their latest event), for
    users with more positive pairs than ``last_n`` (so some are left to train on), -1 for the others,
    with the pairs' counts, in one pass. Ties in time go to the higher item, so the split is
    reproducible.

    Each user's ``last_n`` latest so far are kept best first; each batch's own latest per user (its
    latest time, then its highest item at that time), ``last_n`` rounds of them, are inserted into
    them. Memory holds a few numbers per user, where a window by user in Spark sorted every pair of
    the history. A pass per rank, then one for the items' support, read the 17.5M pairs of a
    20M-event history four times: its matrices took 5.6-5.7 s, 4.6 s with this one.
    """
    n_users, n_items = shape
    latest = np.full((last_n, n_users), NO_TIME)
    chosen = np.full((last_n, n_users), -1, dtype=np.int64)
    positives = np.zeros(n_users, dtype=np.int64)
    positive_per_item = np.zeros(n_items, dtype=np.int64)
    count = zero_confidence = 0
    # Without a holdout the pairs' times are not needed: a night's 16M-pair census reads one column less.
    columns = [*INDEX_PAIR, "confidence", *(["event_ts"] if last_n else [])]
    for batch in pair_batches(history, columns, batch_rows):
        positive = batch.column("confidence").to_numpy() > 0
        count += len(positive)
        zero_confidence += int((~positive).sum())
        users = batch.column("user_idx").to_numpy()[positive]
        items = batch.column("item_idx").to_numpy()[positive]
        positives += np.bincount(users, minlength=n_users)
        positive_per_item += np.bincount(items, minlength=n_items)
        if not last_n:
            continue
        times = batch.column("event_ts").to_numpy().view(np.int64)[positive]
        for _ in range(last_n):
            if not len(users):
                break
            batch_latest = np.full(n_users, NO_TIME)
            np.maximum.at(batch_latest, users, times)
            at_latest = times == batch_latest[users]
            batch_highest = np.full(n_users, -1, dtype=np.int64)
            # Values of the target's own type: ufunc.at has a fast loop only for those (the 32-bit
            # items cast one by one took 1.1 s of a 17.5M-pair census, 0.55 s cast at once).
            np.maximum.at(batch_highest, users[at_latest], items[at_latest].astype(np.int64))
            taken = at_latest & (items == batch_highest[users])
            users, items, times = users[~taken], items[~taken], times[~taken]
            # Insert each user's candidate into their best-first list, pushing the rest down.
            touched = np.flatnonzero(batch_highest >= 0)
            time, item = batch_latest[touched], batch_highest[touched]
            for rank in range(last_n):
                held_time, held_item = latest[rank, touched], chosen[rank, touched]
                later = (time > held_time) | ((time == held_time) & (item > held_item))
                latest[rank, touched] = np.where(later, time, held_time)
                chosen[rank, touched] = np.where(later, item, held_item)
                time, item = np.where(later, held_time, time), np.where(later, held_item, item)
    chosen[:, positives <= last_n] = -1
    return PairCensus(chosen, positive_per_item, count, zero_confidence)


def capped_rows(pairs: pa.RecordBatch, rows: np.ndarray, max_confidence: float) -> pa.Table:
    """The ``rows`` of ``pairs`` as a matrix stores them (``MATRIX_ARROW_SCHEMA``), capped as
    :func:`supported` caps them."""
    kept = pa.Table.from_batches([pairs]).filter(pa.array(rows))
    confidence = pc.min_element_wise(kept.column("confidence"), pa.scalar(max_confidence, pa.float64()))
    return pa.table(
        [kept.column("user_idx"), kept.column("item_idx"), confidence.cast(pa.float32())],
        schema=MATRIX_ARROW_SCHEMA,
    )


def recent_indices(
    history: Path, since: datetime, shape: tuple[int, int], batch_rows: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """The users and the items (of ``shape``) with a pair in a written history whose latest event is
    at or after ``since``."""
    recent = [np.zeros(size, dtype=bool) for size in shape]
    since_then = pa.scalar(since, pa.timestamp("us", tz="UTC"))
    for batch in pair_batches(history, [*INDEX_PAIR, "event_ts"], batch_rows):
        latest_since = pc.greater_equal(batch.column("event_ts"), since_then).to_numpy(zero_copy_only=False)
        for flags, column in zip(recent, INDEX_PAIR, strict=True):
            flags[batch.column(column).to_numpy()[latest_since]] = True
    return np.flatnonzero(recent[0]), np.flatnonzero(recent[1])


def pair_confidences(
    events: DataFrame,
    config: InteractionsConfig,
    as_of: Column,
    keys: tuple[str, str] = ID_PAIR,
    last_seen: bool = False,
    carried: DataFrame | None = None,
) -> DataFrame:
    """(user, item, confidence) per pair of ``keys`` with decay and aggregation, before any filter;
    with ``last_seen``, also the pair's latest ``event_ts``.

    ``carried``: pairs aggregated from older events by an earlier run, already brought to ``as_of``
    (:func:`carried_pairs`); they aggregate with the events' confidences as the older events would.
    """
    user, item = keys
    aggregates = [_combine(config)(F.col("confidence")).alias("confidence")]
    if last_seen:
        aggregates.append(F.max("event_ts").alias("event_ts"))
    per_event = events.select(user, item, decayed(config, as_of).alias("confidence"), "event_ts")
    if carried is not None:
        per_event = per_event.unionByName(carried.select(user, item, "confidence", "event_ts"))
    # Almost every (user, item) pair is unique within a file, so a map-side partial aggregation would
    # hash every event for nothing. The per-event confidences are shuffled by user alone: that also
    # serves the pair aggregation and every later per-user window without another shuffle.
    return per_event.repartition(user).groupBy(user, item).agg(*aggregates)


def event_confidences(
    event_type: pa.Array | pa.ChunkedArray,
    value: np.ndarray,
    seconds: np.ndarray,
    config: InteractionsConfig,
    as_of_seconds: int,
) -> np.ndarray:
    """:func:`decayed` in NumPy: each event's confidence from its type, its value (NaN where it has
    none) and its time in whole seconds since the epoch (as Spark's ``unix_timestamp`` truncates it),
    at ``as_of_seconds``."""
    confidence = np.zeros(len(value))
    for name, spec in config.event_weights.items():
        rows = pc.fill_null(pc.equal(event_type, name), False).to_numpy(zero_copy_only=False)
        if spec.value_map:
            multiplier = value_multipliers(value[rows], spec.value_map)
        elif spec.scale_by_value:
            multiplier = np.nan_to_num(value[rows], nan=0.0)
        else:
            multiplier = np.ones(int(rows.sum()))
        confidence[rows] = spec.weight * multiplier
    if config.half_life_days:
        age_days = (as_of_seconds - seconds) / 86400.0
        confidence = confidence * np.power(0.5, age_days / config.half_life_days)
    return confidence


# The lake's columns a pair's confidence comes from, as the driver reads them.
CONFIDENCE_ARROW_SCHEMA = pa.schema(
    [LAKE_ARROW_SCHEMA.field(name) for name in ("user_id", "item_id", "event_type", "value", "event_ts")]
)


# Events one step of the driver's aggregation reads with their string ids (about 60 bytes each);
# what it keeps of each is its pair, confidence and time (24 bytes). It groups as many at a time.
DRIVER_BATCH_EVENTS = 1 << 21


def driver_pair_confidences(
    partitions: Sequence[Path],
    start: datetime,
    end: datetime,
    maps: tuple[pa.Table, pa.Table],
    config: InteractionsConfig,
    scratch: Path,
    batch_events: int = DRIVER_BATCH_EVENTS,
) -> Iterator[pa.Table]:
    """:func:`pair_confidences` by index pair, with ``last_seen``, as of ``end``, of the events with
    start <= event_ts < end in the lake's date folders ``partitions``, by Arrow and NumPy on the
    driver (``HISTORY_ARROW_SCHEMA``), where Spark would index them by broadcasting the ID maps (the
    users' and the items', ``maps``, which hold every id of them) and shuffle.

    The dates are read about ``batch_events`` events at a time; of each event only its pair (as one
    64-bit key), confidence and time are kept, in as many parts by user range as there are batches,
    and the parts are aggregated one after the other. A single part stays in memory; more wait in
    an uncompressed Arrow file in a temporary folder under ``scratch`` (24 bytes an event), so that
    memory holds one batch and one part's groups whatever the window's size. A 20M-event window
    grouped at once took the process to 2.75 GB (with Spark's heap, 6.6 GB in the bench's weekly
    task), in 2M-event parts to 1.3 GB, and 27.4 s instead of 33.5 s for the whole stage; 100M
    events' parts held in memory would take 2.4 GB beside the JVM of the job's ingest. Yields the
    parts' pairs, disjoint.
    """
    expected = sum(count_rows(partition) for partition in partitions)
    parts = max(1, -(-expected // batch_events))
    if parts == 1:
        keyed = [
            event_pairs(events, maps, config, end)
            for events in event_batches(partitions, start, end, batch_events)
        ]
        yield grouped_pairs(pa.concat_tables(keyed) if keyed else PAIR_EVENT_SCHEMA.empty_table(), config)
        return
    users_per_part = -(-maps[0].num_rows // parts)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".pair-parts-") as folder:
        spilled = Path(folder) / "parts.arrow"
        # The record batches of each part, in the order they were written.
        part_batches: list[list[int]] = [[] for _ in range(parts)]
        next_batch = 0
        with pa.OSFile(str(spilled), "wb") as sink, pa.ipc.new_file(sink, PAIR_EVENT_SCHEMA) as writer:
            for events in event_batches(partitions, start, end, batch_events):
                keyed = event_pairs(events, maps, config, end)
                # The last part takes every user index from its first on (a map's indices may run past
                # its length); a stable sort of 16-bit part numbers is NumPy's radix sort.
                part = np.minimum(
                    np.right_shift(keyed.column("pair").to_numpy(), 32) // users_per_part, parts - 1
                ).astype(np.int16 if parts <= np.iinfo(np.int16).max else np.int32)
                order = np.argsort(part, kind="stable")
                bounds = np.searchsorted(part[order], np.arange(parts + 1))
                by_part = keyed.take(pa.array(order))
                for number, (first, last) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                    for batch in by_part.slice(first, last - first).to_batches():
                        writer.write_batch(batch)
                        part_batches[number].append(next_batch)
                        next_batch += 1
        # Read into memory a part at a time, not mapped: mapped pages read would count in the
        # process's resident memory until the file closed.
        with pa.OSFile(str(spilled)) as source:
            reader = pa.ipc.open_file(source)
            for numbers in part_batches:
                yield grouped_pairs(
                    pa.Table.from_batches([reader.get_batch(n) for n in numbers], PAIR_EVENT_SCHEMA), config
                )


def grouped_pairs(events: pa.Table, config: InteractionsConfig) -> pa.Table:
    """The pairs of ``events`` (``PAIR_EVENT_SCHEMA``) aggregated (``HISTORY_ARROW_SCHEMA``)."""
    grouped = events.group_by("pair").aggregate([("confidence", config.aggregation), ("event_ts", "max")])
    pair = grouped.column("pair")
    return pa.table(
        [
            pc.shift_right(pair, 32).cast(pa.int32()),
            pc.bit_wise_and(pair, 0xFFFFFFFF).cast(pa.int32()),
            grouped.column(f"confidence_{config.aggregation}"),
            grouped.column("event_ts_max"),
        ],
        schema=HISTORY_ARROW_SCHEMA,
    )


# An event as the driver's aggregation keeps it: its (user, item) indices packed as pair_keys packs them.
PAIR_EVENT_SCHEMA = pa.schema(
    [
        ("pair", pa.int64()),
        ("confidence", pa.float64()),
        ("event_ts", HISTORY_ARROW_SCHEMA.field("event_ts").type),
    ]
)


def event_batches(
    partitions: Sequence[Path], start: datetime, end: datetime, batch_events: int
) -> Iterator[pa.Table]:
    """The events of ``partitions`` with start <= event_ts < end (``CONFIDENCE_ARROW_SCHEMA``), whole
    dates at a time, each batch of at least ``batch_events`` events but the last: an ID map's lookup
    set is built once a batch."""
    held: list[pa.Table] = []
    rows = 0
    for partition in partitions:
        events = (
            ds.dataset(str(partition), format="parquet")
            .to_table(columns=CONFIDENCE_ARROW_SCHEMA.names, filter=lake_window(start, end))
            .cast(CONFIDENCE_ARROW_SCHEMA)
        )
        held.append(events)
        rows += events.num_rows
        if rows >= batch_events:
            yield pa.concat_tables(held)
            held, rows = [], 0
    if held:
        yield pa.concat_tables(held)


def event_pairs(
    events: pa.Table, maps: tuple[pa.Table, pa.Table], config: InteractionsConfig, as_of: datetime
) -> pa.Table:
    """Each event's pair key, confidence as of ``as_of`` and time (``PAIR_EVENT_SCHEMA``)."""
    micros = events.column("event_ts").cast(pa.int64()).to_numpy()
    confidence = event_confidences(
        events.column("event_type"),
        events.column("value").to_numpy(zero_copy_only=False),
        np.floor_divide(micros, 1_000_000),
        config,
        int(as_of.timestamp()),
    )
    users, items = (
        map_indices(events.column(f"{side}_id"), id_map).to_numpy()
        for side, id_map in zip(("user", "item"), maps, strict=True)
    )
    return pa.table(
        [pa.array(pair_keys(users, items)), pa.array(confidence), events.column("event_ts")],
        schema=PAIR_EVENT_SCHEMA,
    )


def map_indices(ids: pa.ChunkedArray, id_map: pa.Table) -> pa.Array:
    """The index ``id_map`` (id, idx) gives each of ``ids``, which it must all hold."""
    positions = pc.index_in(ids, value_set=id_map.column("id").combine_chunks())
    if positions.null_count:
        raise ValueError(f"{positions.null_count} ids are not in the ID map extended for them")
    return id_map.column("idx").take(positions).cast(pa.int32())


def merged_pairs(
    events: DataFrame,
    config: InteractionsConfig,
    as_of: Column,
    carried: DataFrame,
    keys: tuple[str, str] = INDEX_PAIR,
) -> DataFrame:
    """:func:`pair_confidences` of ``events`` with ``carried`` (with ``last_seen``), for events far
    fewer than the carried pairs (a holdout's days against the training pairs, not yet written) that
    fit in memory; a merge into a written history is :func:`write_merged_history`'s.

    Only the carried pairs the events share are aggregated again; every other carried pair is passed
    through as it is, by joins against the events' broadcast pairs that never shuffle the history.
    """
    event_pairs = F.broadcast(events.select(*keys).distinct())
    shared = carried.join(event_pairs, list(keys), "left_semi")
    untouched = carried.join(event_pairs, list(keys), "left_anti")
    return untouched.select(*keys, "confidence", "event_ts").unionByName(
        pair_confidences(events, config, as_of, keys, last_seen=True, carried=shared)
    )


def carried_pairs(history: DataFrame, config: InteractionsConfig, elapsed: timedelta) -> DataFrame:
    """Pair aggregates (``HISTORY_SCHEMA``) as of ``elapsed`` later than they were computed."""
    if not config.half_life_days:
        return history
    return history.withColumn("confidence", F.col("confidence") * F.lit(decay_factor(config, elapsed)))


def decay_factor(config: InteractionsConfig, elapsed: timedelta) -> float:
    """What a pair aggregate's confidence is multiplied by ``elapsed`` later (1 without decay).

    Decay halves every event's confidence at the same rate, so a sum or a maximum of decayed
    confidences decays by the same factor as each of its terms.
    """
    if not config.half_life_days:
        return 1.0
    return float(0.5 ** (elapsed.total_seconds() / 86400.0 / config.half_life_days))


# History pairs one merge step reads: each step's lookup builds its set of the pairs since anew (in
# Arrow's is_in, 0.13 s for a week's 1.7M); 4M pairs (about 100 MB) a step build it 5 times over
# 17.5M pairs, where one call per 1M-pair row group built it 17 times (with is_in, 4.9 s against 2.5
# for the whole merge's lookups over a week's 17M pairs).
MERGE_BATCH_ROWS = 1 << 22


def write_merged_history(
    since: pa.Table,
    history: Path,
    config: InteractionsConfig,
    elapsed: timedelta,
    target: Path,
    batch_rows: int = MERGE_BATCH_ROWS,
) -> None:
    """Write into the folder ``target`` the pair history in the folder ``history`` (``HISTORY_SCHEMA``),
    brought ``elapsed`` forward (:func:`carried_pairs`), with ``since`` merged in: the pair aggregates
    (with ``last_seen``) of the events since (a night's, a week's), at the same ``as_of``, few enough
    to hold in memory.

    As in :func:`merged_pairs`, only the carried pairs ``since`` shares are aggregated again; the
    others pass through as they are, ``batch_rows`` at a time, so memory holds a batch and ``since``.
    Streamed through Arrow, the 17.7M pairs of a 20M-event history merged with a night's in
    2.4-3.0 s, where Spark's joins took 10.7 s: they read the history twice (the shared pairs, the
    untouched ones) before writing it.
    """
    since_users = since.column("user_idx").to_numpy()
    # Pairs are looked up as 64-bit keys in pandas' hash set (a Series over the keys, not a copy):
    # 17.5M history pairs against a week's took 1.0 s, against 2.2-2.4 s in Arrow's is_in. The keys
    # since are not made unique first (a pair seen on several days repeats), which took 0.5 s more.
    since_keys = pair_keys(since_users, since.column("item_idx").to_numpy())
    # Only pairs of users active since can be shared: the pairs of every other user skip the key
    # lookup on one read of a flag per user.
    active = np.zeros(int(since_users.max(initial=-1)) + 1, dtype=bool)
    active[since_users] = True
    factor = decay_factor(config, elapsed)
    shared: list[pa.Table] = []
    with history_writer(target) as writer:
        for pairs in pair_tables(history, HISTORY_ARROW_SCHEMA.names, batch_rows):
            pairs = pairs.cast(HISTORY_ARROW_SCHEMA)
            if factor != 1.0:
                pairs = pairs.set_column(2, "confidence", pc.multiply(pairs.column("confidence"), factor))
            users, items = pairs.column("user_idx").to_numpy(), pairs.column("item_idx").to_numpy()
            candidate = users < len(active)
            candidate[candidate] = active[users[candidate]]
            shared_by_since = np.zeros(len(users), dtype=bool)
            candidate_keys = pd.Series(pair_keys(users[candidate], items[candidate]), copy=False)
            shared_by_since[candidate] = candidate_keys.isin(since_keys).to_numpy()
            shared.append(pairs.filter(shared_by_since))
            writer.write_table(pairs.filter(~shared_by_since))
        combined = (
            pa.concat_tables([*shared, since.select(HISTORY_ARROW_SCHEMA.names).cast(HISTORY_ARROW_SCHEMA)])
            .group_by(list(INDEX_PAIR))
            .aggregate([("confidence", config.aggregation), ("event_ts", "max")])
        )
        merged = combined.select([*INDEX_PAIR, f"confidence_{config.aggregation}", "event_ts_max"])
        writer.write_table(merged.rename_columns(HISTORY_ARROW_SCHEMA.names).cast(HISTORY_ARROW_SCHEMA))


def write_history(parts: Iterable[pa.Table], target: Path) -> None:
    """Write the pair aggregates ``parts`` (``HISTORY_ARROW_SCHEMA``, disjoint) as the history in the
    folder ``target``."""
    with history_writer(target) as writer:
        for pairs in parts:
            writer.write_table(pairs)


def history_writer(target: Path) -> pq.ParquetWriter:
    """A writer of the pair history's one file in the folder ``target``, without dictionary encoding,
    which would be tried on columns of hundreds of thousands of distinct indices, nor compression
    (:data:`~recsys_pipeline.tables.PAIR_FILE_COMPRESSION`)."""
    target.mkdir(parents=True, exist_ok=True)
    return pq.ParquetWriter(
        target / "part-00000.parquet",
        HISTORY_ARROW_SCHEMA,
        use_dictionary=False,
        compression=PAIR_FILE_COMPRESSION,
    )


def pair_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each (user, item) pair of indices as one 64-bit integer (indices are 32-bit). In NumPy, from
    the two columns alone: a merge step's keys took 0.1-0.2 s where Arrow's filter of the whole pairs
    and its cast, shift and add took 0.3-0.9 s."""
    return (users.astype(np.int64) << 32) + items


def history_settings_hash(config: InteractionsConfig, min_event_time: datetime) -> str:
    """sha256 of the settings that make pair aggregates what they are: aggregates made under other
    settings cannot be carried forward."""
    settings = {
        **config.model_dump(mode="json", include={"event_weights", "half_life_days", "aggregation"}),
        "min_event_time": min_event_time.isoformat(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def history_columns(pairs: DataFrame) -> DataFrame:
    """The columns pair aggregates are kept with for later runs to carry forward (``HISTORY_SCHEMA``)."""
    return pairs.select("user_idx", "item_idx", F.col("confidence").cast("double"), "event_ts")


def holdout_cut(events: DataFrame, holdout: HoldoutConfig, window_end: datetime) -> datetime:
    """Where a global temporal split starts the holdout: ``days`` before the window's end, or just
    after the time by which all but ``share`` of the window's events happened."""
    if holdout.strategy == "days":
        return window_end - timedelta(days=holdout.days)
    quantile = events.select(F.col("event_ts").cast("double").alias("seconds")).approxQuantile(
        "seconds", [1 - holdout.share], 1e-4
    )
    if not quantile:
        return window_end
    # Events at the quantile's own time train, so ties never push the holdout past its share.
    return datetime.fromtimestamp(quantile[0], tz=UTC) + timedelta(microseconds=1)


def evaluable_users(
    holdout: DataFrame,
    train: DataFrame,
    broadcast: bool,
    keys: tuple[str, str] = INDEX_PAIR,
) -> int:
    """Users with at least one holdout item they did not train on: whom evaluation can score.

    With ``broadcast`` (a holdout small enough to hold in memory) the training pairs stream past the
    holdout's pairs once, where a join of the two would shuffle every training pair: in the 20M-event
    interactions bench, 3.5 s against 12 s.
    """
    pairs = list(keys)
    if broadcast:
        # Only the training pairs the holdout shares can hide a holdout item.
        train = train.join(F.broadcast(holdout.select(*pairs)), pairs, "left_semi")
    return holdout.join(train, pairs, "left_anti").select(keys[0]).distinct().count()


def check_holdout_size(users: int, min_users: int, holdout: HoldoutConfig) -> None:
    if users < min_users:
        raise HoldoutTooSmallError(
            f"the holdout has {users} users with an item they did not train on, below "
            f"evaluation.min_users={min_users}: a gate on so few users decides on noise. Hold out more "
            f"(now {holdout.describe()}; per_user_last holds out every user with enough history) "
            "or lower evaluation.min_users"
        )


def entity_activity(events: DataFrame, column: str, recent_start: datetime, *sums: Column) -> DataFrame:
    """(id, recent, *sums): every id of ``column`` in the events, whether it has any since
    ``recent_start``, and any further per-id aggregates."""
    return events.groupBy(F.col(column).alias("id")).agg(
        F.max(F.col("event_ts") >= F.lit(recent_start)).alias("recent"), *sums
    )


# What the input fingerprint hashes of each event.
FINGERPRINT_COLUMNS = ["user_id", "item_id", "event_type", "value", "event_ts"]


def fingerprint_sums() -> list[Column]:
    """Aggregates of a group's events (count and 64-bit hash sums) that add up to the input fingerprint."""
    return hash_sums(*FINGERPRINT_COLUMNS)


@dataclass(frozen=True)
class InputFingerprint:
    """What identifies the events a matrix was built from: their count and the sums of their 64-bit
    hashes' halves, equal for the same events however the lake's files are cut. Written and tagged
    as ``events:hash_high:hash_low``."""

    events: int
    hash_high: int
    hash_low: int

    def __str__(self) -> str:
        return f"{self.events}:{self.hash_high}:{self.hash_low}"

    @classmethod
    def parse(cls, text: str) -> InputFingerprint:
        events, hash_high, hash_low = (int(part) for part in text.strip().split(":"))
        return cls(events, hash_high, hash_low)

    def __add__(self, other: InputFingerprint) -> InputFingerprint:
        """The fingerprint of both sets of events (the sums add up)."""
        return InputFingerprint(
            self.events + other.events, self.hash_high + other.hash_high, self.hash_low + other.hash_low
        )


def input_fingerprint(groups: DataFrame) -> InputFingerprint:
    """The fingerprint of the events in groups carrying ``fingerprint_sums``."""
    row = groups.agg(*(F.sum(name) for name in ("events", "hash_high", "hash_low"))).collect()[0]
    return InputFingerprint(*(int(value or 0) for value in row))


def driver_input_fingerprint(partitions: Sequence[Path], start: datetime, end: datetime) -> InputFingerprint:
    """:func:`input_fingerprint` of the lake's events with start <= event_ts < end (its date folders
    ``partitions``), by Arrow a batch at a time: the sums Spark's :func:`fingerprint_sums` give
    (:mod:`recsys_pipeline.hashing`), so that a history's fingerprint adds up whichever computed it,
    without a Spark job for a night's events."""
    fingerprint = InputFingerprint(0, 0, 0)
    for partition in partitions:
        dataset = ds.dataset(str(partition), format="parquet")
        for batch in dataset.to_batches(columns=FINGERPRINT_COLUMNS, filter=lake_window(start, end)):
            sums = hash_sums_of([batch.column(name) for name in FINGERPRINT_COLUMNS])
            fingerprint += InputFingerprint(*sums)
    return fingerprint


def unmapped_ids(events: DataFrame, column: str, existing: DataFrame | None) -> DataFrame:
    """The ids of ``column`` that ``existing`` lacks (with repeats). In steady state almost every id is
    mapped already, so an anti-join leaves the string work of numbering them to the few new ones."""
    ids = events.select(F.col(column).alias("id"))
    return ids if existing is None else ids.join(existing.select("id"), "id", "left_anti")


def extend_id_map(existing: DataFrame | None, ids: DataFrame, size: int) -> DataFrame:
    """Append unseen ids with indices from ``size`` on (``existing`` holds indices 0 to size - 1: maps
    are dense); existing indices never change.

    New ids are numbered in sorted order so that re-running the same input gives the same map.
    """
    distinct = ids.select(F.col(ids.columns[0]).alias("id")).distinct()
    if existing is None:
        return distinct.withColumn("idx", (F.row_number().over(Window.orderBy("id")) - 1).cast("int"))
    new = distinct.join(existing, "id", "left_anti")
    numbered = new.withColumn(
        "idx", (F.row_number().over(Window.orderBy("id")) - 1 + F.lit(size)).cast("int")
    )
    return existing.unionByName(numbered)


# An ID map as Arrow writes it: the types Spark writes it with.
ID_MAP_ARROW_SCHEMA = pa.schema([("id", pa.string()), ("idx", pa.int32())])
# Events an ID map's Arrow pass reads at once per thread: one column of ids and their timestamps.
ID_BATCH_ROWS = 1 << 20


class TooManyIds(Exception):
    """More distinct ids than an ID map held by the driver may have."""


def window_ids(
    partitions: Sequence[Path], column: str, start: datetime, end: datetime, max_rows: int
) -> pa.Array | None:
    """The distinct ids of ``column`` in the events with start <= event_ts < end, read by Arrow on the
    driver from the lake's date folders ``partitions``; None when there are more than ``max_rows``, the
    most the driver holds (Spark then extends the map).

    Each date's distinct ids are found on a thread of its own: 500k users of 20M events took about
    2 s, where Spark's shuffle for the distinct ids and its numbering over one partition took 8 s.
    Memory holds at most about ``max_rows`` ids more than the distinct ones: the dates' ids are merged
    as they come, where a 100M-event weekly's 57 dates of about 1M distinct users each, held until all
    were read, took the driver to 1.6 GB.
    """
    in_window = lake_window(start, end)

    def distinct(chunks: list[pa.Array]) -> pa.Array:
        ids = pc.unique(pa.chunked_array(chunks, pa.string()))
        if len(ids) > max_rows:
            raise TooManyIds
        return ids

    def merged(arrays: Iterable[pa.Array]) -> pa.Array:
        """The distinct ids of ``arrays``, those in hand merged whenever they are more than ``max_rows``."""
        chunks: list[pa.Array] = []
        held = 0
        for ids in arrays:
            chunks.append(ids)
            held += len(ids)
            if held > max_rows:
                chunks = [distinct(chunks)]
                held = len(chunks[0])
        return distinct(chunks)

    def date_ids(partition: Path) -> pa.Array:
        batches = ds.dataset(str(partition), format="parquet").to_batches(
            columns=[column], filter=in_window, batch_size=ID_BATCH_ROWS, use_threads=False
        )
        return merged(pc.unique(batch.column(0)) for batch in batches)

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(pa.cpu_count(), len(partitions)))) as pool:
            return merged(pool.map(date_ids, partitions))
    except TooManyIds:
        return None


def extend_id_map_on_driver(existing: pa.Table | None, ids: pa.Array, max_rows: int) -> pa.Table | None:
    """:func:`extend_id_map` by Arrow on the driver: ``existing`` (id, idx) with the distinct ``ids`` it
    lacks appended, numbered from its size in sorted order; None when the map would hold more than
    ``max_rows`` ids."""
    size = 0 if existing is None else existing.num_rows
    if existing is not None:
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=existing.column("id"))))
    if size + len(ids) > max_rows:
        return None
    new = pa.table(
        [ids.take(pc.sort_indices(ids)), pa.array(np.arange(size, size + len(ids), dtype=np.int32))],
        schema=ID_MAP_ARROW_SCHEMA,
    )
    if existing is None:
        return new
    return pa.concat_tables(
        [existing.select(ID_MAP_ARROW_SCHEMA.names).cast(ID_MAP_ARROW_SCHEMA).sort_by("idx"), new]
    )


def read_id_map_frame(spark: SparkSession, path: Path) -> DataFrame | None:
    """A shared ID map as a DataFrame, or None before the first run has written one."""
    return spark.read.parquet(str(path)) if path.exists() else None


def indexed_events(
    events: DataFrame,
    maps: IdMaps,
    broadcast_max_rows: int,
    id_hash: Callable[[Column], Column] = F.xxhash64,
) -> DataFrame:
    """The events with ``user_idx`` and ``item_idx`` from maps that hold every one of their ids.

    The joins match a 64-bit hash of the id, which probes far cheaper than the string, and confirm
    the id itself only on a match: exact even where two ids share a hash, with no pass over the maps
    to rule that out. (The confirmation sits inside ``coalesce`` so that Spark keeps it out of the
    join key it hashes.)

    A map of at most ``broadcast_max_rows`` ids is broadcast; a larger one joins by a shuffle. The
    choice is never left to Spark's size estimates: those of events are their compressed files',
    so a week's 12 million events looked smaller than a map of 2.5 million ids held in memory, and
    broadcasting the events ran the driver out of memory.
    """
    for entity, id_map in (("user", maps.users), ("item", maps.items)):
        id_column, idx_column = f"{entity}_id", f"{entity}_idx"
        hashed = id_map.select(
            id_hash(F.col("id")).alias("key"), F.col("id").alias("mapped_id"), F.col("idx").alias(idx_column)
        )
        hashed = F.broadcast(hashed) if id_map.count() <= broadcast_max_rows else hashed.hint("merge")
        matches = (id_hash(F.col(id_column)) == hashed["key"]) & F.coalesce(
            F.col(id_column) == hashed["mapped_id"], F.lit(False)
        )
        events = events.join(hashed, matches).drop("key", "mapped_id")
    return events


def matrix_columns(pairs: DataFrame) -> DataFrame:
    """The (user_idx, item_idx, confidence FLOAT) columns a matrix is stored with."""
    return pairs.select("user_idx", "item_idx", F.col("confidence").cast("float"))
