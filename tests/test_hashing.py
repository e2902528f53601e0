"""The driver's xxhash64 is Spark's, bit for bit: sums of event hashes add up whichever computed them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F

from recsys_pipeline.events import hash_sums as spark_hash_sums
from recsys_pipeline.hashing import hash_sums_of, spark_xxhash64


def tricky_events(rows: int = 400) -> pa.Table:
    """Strings across XXH64's block sizes (empty, 1-3 bytes, 4, 8, 31-33, 64+, multi-byte UTF-8,
    control characters, nulls); doubles with -0.0, NaN, infinities, subnormals; timestamps before and
    after the epoch, nulls too."""
    rng = np.random.default_rng(7)
    strings: list[str | None] = [
        "", "a", "ab", "abc", "abcd", "abcde", "é", "用户", "x" * 7, "x" * 8, "x" * 9,
        "y" * 31, "y" * 32, "y" * 33, "z" * 64, "z" * 65, "q" * 100, None, " u1 ", "\x00\t",
    ]  # fmt: skip
    while len(strings) < rows:
        length = int(rng.integers(0, 80))
        strings.append("".join(chr(int(code)) for code in rng.integers(32, 0x3000, size=length)))
    numbers = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1.5, None, 1e300, -2.5e-310]
    values = [numbers[i % len(numbers)] for i in range(rows)]
    micros = rng.integers(-(2**40), 2**52, size=rows).tolist()
    times = [None if i % 17 == 0 else micros[i] for i in range(rows)]
    return pa.table(
        {
            "user_id": pa.array(strings, pa.string()),
            "item_id": pa.array(list(reversed(strings)), pa.string()),
            "value": pa.array(values, pa.float64()),
            "event_ts": pa.array(times, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )


def test_each_row_hashes_as_in_spark(spark) -> None:
    table = tricky_events()
    frame = spark.createDataFrame(table)
    for columns in (["user_id"], ["value"], ["event_ts"], ["user_id", "value", "event_ts", "item_id"]):
        expected = [row[0] for row in frame.select(F.xxhash64(*columns)).collect()]
        hashed = spark_xxhash64([table[name] for name in columns]).view(np.int64).tolist()
        assert hashed == expected, columns


def test_hash_sums_equal_spark_aggregates_over_chunked_columns(spark) -> None:
    table = pa.concat_tables([tricky_events(300), tricky_events(150)])
    columns = ["user_id", "item_id", "value", "event_ts"]
    row = spark.createDataFrame(table).agg(*spark_hash_sums(*columns)).collect()[0]
    assert hash_sums_of([table[name] for name in columns]) == (
        row["events"],
        row["hash_high"],
        row["hash_low"],
    )
    assert hash_sums_of([pa.chunked_array([], pa.string())]) == (0, 0, 0)
