"""Spark's ``xxhash64`` over Arrow columns, in NumPy: the same 64-bit hash of each row, so that sums
of event hashes (a date's contents, a matrix's input fingerprint) add up whichever of Spark or the
driver computed them.

Spark hashes a row's columns in turn, each column's hash the seed of the next (42 for the first), a
null leaving the running hash as it was: a string as its UTF-8 bytes, a double as its bits (-0.0 as
0.0, every NaN as Java's one), a timestamp as its microseconds since the epoch, each by the standard
XXH64 algorithm. Every step here runs over all rows at once; a string column takes one pass per 8
bytes of its longest value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPARK_SEED = 42
PRIME_1 = np.uint64(0x9E3779B185EBCA87)
PRIME_2 = np.uint64(0xC2B2AE3D27D4EB4F)
PRIME_3 = np.uint64(0x165667B19E3779F9)
PRIME_4 = np.uint64(0x85EBCA77C2B2AE63)
PRIME_5 = np.uint64(0x27D4EB2F165667C5)
JAVA_NAN_BITS = np.uint64(0x7FF8000000000000)
LOW_HALF = np.uint64(0xFFFFFFFF)


def _rotate(value: np.ndarray, bits: int) -> np.ndarray:
    return (value << np.uint64(bits)) | (value >> np.uint64(64 - bits))


def _round(accumulator: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotate(accumulator + lane * PRIME_2, 31) * PRIME_1


def _merge_round(hash_: np.ndarray, accumulator: np.ndarray) -> np.ndarray:
    return (hash_ ^ _round(np.zeros_like(accumulator), accumulator)) * PRIME_1 + PRIME_4


def _avalanche(hash_: np.ndarray) -> np.ndarray:
    hash_ = (hash_ ^ (hash_ >> np.uint64(33))) * PRIME_2
    hash_ = (hash_ ^ (hash_ >> np.uint64(29))) * PRIME_3
    return hash_ ^ (hash_ >> np.uint64(32))


def _hash_longs(values: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """XXH64 of each 8-byte little-endian value under its row's seed."""
    hash_ = seed + PRIME_5 + np.uint64(8)
    hash_ ^= _round(np.zeros_like(values), values)
    return _avalanche(_rotate(hash_, 27) * PRIME_1 + PRIME_4)


def utf8_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's value offsets (one more than its values) and UTF-8 bytes, as NumPy views."""
    strings = strings.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)
    data = strings.buffers()[2]
    return (
        offsets[strings.offset : strings.offset + len(strings) + 1],
        np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8),
    )


def _hash_strings(column: pa.Array, seed: np.ndarray) -> np.ndarray:
    """XXH64 of each string's UTF-8 bytes under its row's seed (nulls are hashed as empty; the caller
    keeps their seed)."""
    offsets, data = utf8_bytes(column)
    # Padded so that a read of 8 bytes from any value's last byte stays inside the array.
    data = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    start = offsets[:-1].copy()
    length = (offsets[1:] - offsets[:-1]).astype(np.int64)

    def load(position: np.ndarray, width: int) -> np.ndarray:
        """The little-endian word of ``width`` bytes at each position, a byte at a time."""
        word = data[position].astype(np.uint64)
        for byte in range(1, width):
            word |= data[position + byte].astype(np.uint64) << np.uint64(8 * byte)
        return word

    hash_ = seed + PRIME_5
    stripes = length // 32
    long_rows = np.flatnonzero(stripes > 0)
    if len(long_rows):
        row_seed = seed[long_rows]
        lanes = [row_seed + PRIME_1 + PRIME_2, row_seed + PRIME_2, row_seed.copy(), row_seed - PRIME_1]
        for stripe in range(int(stripes.max())):
            active = stripe < stripes[long_rows]
            position = np.where(active, start[long_rows] + 32 * stripe, 0)
            for lane in range(4):
                word = load(position + 8 * lane, 8)
                lanes[lane] = np.where(active, _round(lanes[lane], word), lanes[lane])
        merged = _rotate(lanes[0], 1) + _rotate(lanes[1], 7) + _rotate(lanes[2], 12) + _rotate(lanes[3], 18)
        for accumulator in lanes:
            merged = _merge_round(merged, accumulator)
        hash_[long_rows] = merged
    hash_ += length.astype(np.uint64)
    position = start + 32 * stripes
    remaining = length - 32 * stripes
    while (remaining >= 8).any():
        active = remaining >= 8
        word = load(np.where(active, position, 0), 8)
        stepped = _rotate(hash_ ^ _round(np.zeros_like(word), word), 27) * PRIME_1 + PRIME_4
        hash_ = np.where(active, stepped, hash_)
        position += np.where(active, 8, 0)
        remaining -= np.where(active, 8, 0)
    active = remaining >= 4
    if active.any():
        word = load(np.where(active, position, 0), 4)
        stepped = _rotate(hash_ ^ (word * PRIME_1), 23) * PRIME_2 + PRIME_3
        hash_ = np.where(active, stepped, hash_)
        position += np.where(active, 4, 0)
        remaining -= np.where(active, 4, 0)
    while (remaining > 0).any():
        active = remaining > 0
        byte = data[np.where(active, position, 0)].astype(np.uint64)
        stepped = _rotate(hash_ ^ (byte * PRIME_5), 11) * PRIME_1
        hash_ = np.where(active, stepped, hash_)
        position += active
        remaining -= active
    return _avalanche(hash_)


def _column_bits(column: pa.Array) -> np.ndarray:
    """A double, timestamp or integer column's values as the 64-bit words Spark hashes."""
    if pa.types.is_floating(column.type):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        values = np.where(values == 0.0, 0.0, values)  # -0.0 hashes as 0.0
        bits = values.view(np.uint64)
        return np.where(np.isnan(values), JAVA_NAN_BITS, bits)
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.timestamp("us", tz=column.type.tz))
        return column.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
    if pa.types.is_int64(column.type):
        return column.to_numpy(zero_copy_only=False).view(np.uint64)
    raise TypeError(f"no Spark hash for Arrow type {column.type}")


def spark_xxhash64(columns: Sequence[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """Spark's ``xxhash64(*columns)`` of each row, as unsigned 64-bit words (Spark's long, bit for bit).

    Strings, doubles, 64-bit integers and timestamps (to the microsecond) only: what the lake holds."""
    rows = len(columns[0]) if columns else 0
    hash_ = np.full(rows, SPARK_SEED, dtype=np.uint64)
    for column in columns:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        present = pc.is_valid(array).to_numpy(zero_copy_only=False)
        filled = array.fill_null(pa.scalar("" if pa.types.is_string(array.type) else 0).cast(array.type))
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            hashed = _hash_strings(filled, hash_)
        else:
            hashed = _hash_longs(_column_bits(filled), hash_)
        hash_ = np.where(present, hashed, hash_)
    return hash_


def hash_sums_of(columns: Sequence[pa.Array | pa.ChunkedArray]) -> tuple[int, int, int]:
    """The rows' count and the sums of the halves of their :func:`spark_xxhash64`: what
    ``events.hash_sums`` aggregates in Spark over the same columns."""
    hashes = spark_xxhash64(columns)
    return len(hashes), int((hashes >> np.uint64(32)).sum()), int((hashes & LOW_HALF).sum())
