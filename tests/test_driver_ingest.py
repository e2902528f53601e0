"""The driver's ingest is Spark's: over the same Parquet sources both stage the same lake events,
quarantine the same records with the same reasons and text, and account for every row alike; a source
they would read differently goes to Spark."""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.driver_ingest import driver_source, ingest_on_driver, java_double_text
from recsys_pipeline.erasure import ErasureLedger
from recsys_pipeline.events import EVENT_COLUMNS, ingest, read_source, source_files, write_quarantine
from recsys_pipeline.jobs import run_spark_job
from recsys_pipeline.pipelines import INGEST_JOB
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.state import StateLayout
from tests.conftest import TEST_OVERRIDES

WINDOW = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 8, tzinfo=UTC))
INGESTED_AT = datetime(2026, 1, 1, 12, 30, 15, 123456, tzinfo=UTC)
NOON = int(datetime(2024, 1, 2, 12, tzinfo=UTC).timestamp())
DAY = 86_400
STRINGS = pa.schema(
    [("user", pa.string()), ("item", pa.string()), ("type", pa.string()), ("value", pa.float64()),
     ("ts", pa.int64()), ("note", pa.string())]
)  # fmt: skip
NUMBERS = pa.schema(
    [("user", pa.int64()), ("item", pa.int32()), ("type", pa.string()), ("value", pa.int64()),
     ("ts", pa.float64())]
)  # fmt: skip


def string_rows(offset: int) -> list[tuple[Any, ...]]:
    """Every reason, trims and case, copies, values and timestamps at their edges, text to escape."""
    t = NOON + offset
    return [
        ("u1", "i1", "view", 1.0, t, None),
        (" u2 ", "i2", " CLICK ", 2.5, t + 1, "plain"),
        ("u3", "i3", "view", 1.0, NOON, None),  # the same in both files: a duplicate in the second
        ("u3", "i3", "view", 1.0, NOON, None),  # and here already
        (None, "i1", "view", 1e20, t, 'quote " backslash \\ newline \n bell \x07 é 用'),
        ("u4", "", "view", 0.0001, t, None),
        ("u\t5", "i1", "view", 123.456, t, None),
        ("x" * 300, "i1", "view", 1.0, t, None),
        ("u18", "i\u0085", "view", 1.0, t, None),  # a C1 control character
        ("u\x7f19", "i1", "view", 1.0, t, None),
        ("u\u00a020", "i\u00e9", "view", 1.0, t, None),  # a no-break space and é: no controls
        ("u6", "i1", "like", 1.0, t, None),
        ("u7", "i1", None, 1.0, t, None),
        ("u7b", "i1", "V\u0130EW", 1.0, t, None),  # Java lower-cases İ to i and a combining dot
        ("u8", "i1", "view", -1.0, t, None),
        ("u9", "i1", "view", float("nan"), t, None),
        ("u10", "i1", "view", float("inf"), t, None),
        ("u11", "i1", "view", None, t, None),
        ("u12", "i1", "view", 1.0, None, None),
        ("u13", "i1", "view", 1.0, 10**17, None),  # beyond a long's microseconds
        ("u14", "i1", "view", 1.0, int(datetime(1980, 1, 1, tzinfo=UTC).timestamp()), None),
        ("u15", "i1", "view", 1.0, int(datetime(2030, 1, 1, tzinfo=UTC).timestamp()), None),
        ("u16", "i1", "view", 1.0, int(datetime(2023, 6, 1, tzinfo=UTC).timestamp()), None),
        ("u17", "i2", "watch", 30.5, t + 2 * DAY, None),
        ("forget-me", "i1", "view", 1.0, t, "gone"),
        ("forget-me", None, "view", 1.0, t, "gone too"),
    ]


def number_rows(offset: int) -> list[tuple[Any, ...]]:
    """Integer ids and values, a double timestamp in milliseconds."""
    ms = float(NOON + offset) * 1000
    return [
        (1, 10, "view", 1, ms + 0.5),
        (2, 20, "click", 3, ms),
        (3, 30, "view", -2, ms),
        (None, 40, "view", 1, ms),
        (4, 50, "view", 1, float("nan")),
        (5, 60, "view", 1, float("inf")),
        (6, 70, "view", 1, -1e300),
        (7, 80, "purchase", 1, ms + 3 * DAY * 1000),
        (2, 20, "click", 3, ms),
    ]


def write_source(folder: Path, schema: pa.Schema, rows: Any) -> Path:
    """A folder source partitioned by day, as the synthetic generator writes one."""
    for number, day in enumerate(("2024-01-02", "2024-01-03")):
        part = folder / f"day={day}"
        part.mkdir(parents=True)
        columns = list(zip(*rows(number * DAY), strict=True))
        table = pa.table(
            {field.name: pa.array(values, field.type) for field, values in zip(schema, columns, strict=True)}
        )
        pq.write_table(table, part / f"part-{number}.parquet")
    return folder


def parquet_config(make_config: Any, path: Path, unit: str = "s", **overrides: Any) -> PipelineConfig:
    return make_config(
        **{
            "source.name": "contract",
            "source.path": str(path),
            "source.format": "parquet",
            "source.timestamp_unit": unit,
            "source.mapping": {
                "user_id": "user",
                "item_id": "item",
                "event_type": "type",
                "value": "value",
                "timestamp": "ts",
            },
            "events.max_quarantine_share": 1.0,
            **overrides,
        }
    )


def staged_rows(staging: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The lake events staged (with their dates) and the quarantine written from them, sorted."""
    partitioning = ds.partitioning(pa.schema([("event_date", pa.string())]), flavor="hive")
    rows = ds.dataset(str(staging), format="parquet", partitioning=partitioning).to_table()
    accepted = rows.filter(ds.field("reason").is_null()).select([*EVENT_COLUMNS, "event_date"])
    write_quarantine(staging, staging.with_name(staging.name + "_quarantine"))
    quarantine = ds.dataset(str(staging.with_name(staging.name + "_quarantine"))).to_table()
    return (
        sorted(tuple(row.values()) for row in accepted.to_pylist()),
        sorted(tuple(row.values()) for row in quarantine.to_pylist()),
    )


def assert_driver_stages_what_spark_does(
    spark, config: PipelineConfig, tmp_path: Path, **options: Any
) -> Any:
    files = list(source_files(config.source))
    found = driver_source(config.source, files, 1000)
    assert found is not None
    by_spark = ingest(
        read_source(spark, config.source, files), config.source, config.events, *WINDOW, INGESTED_AT,
        tmp_path / "spark", **options,
    )  # fmt: skip
    on_driver = ingest_on_driver(
        found, config.source, config.events, *WINDOW, INGESTED_AT, tmp_path / "driver", **options
    )
    assert on_driver.metrics == by_spark.metrics
    assert on_driver.files == by_spark.files
    assert on_driver.dates == by_spark.dates
    lake_events, quarantine = staged_rows(tmp_path / "driver")
    assert (lake_events, quarantine) == staged_rows(tmp_path / "spark")
    return on_driver, lake_events, quarantine


def test_a_string_source_is_staged_and_accounted_for_as_spark_does(spark, make_config, tmp_path) -> None:
    config = parquet_config(make_config, write_source(tmp_path / "source", STRINGS, string_rows))
    result, lake_events, quarantine = assert_driver_stages_what_spark_does(spark, config, tmp_path)
    assert result.metrics["events_ingested"] == 13 and result.metrics["quarantine_duplicate"] == 3
    reasons = {row[1] for row in quarantine}
    assert reasons == {
        "missing_user_id", "missing_item_id", "invalid_id", "unknown_event_type", "invalid_value",
        "unparseable_timestamp", "invalid_timestamp", "before_floor", "future_timestamp", "duplicate",
    }  # fmt: skip
    assert any('"value":"1.0E20"' in row[0] and "\\u0007" in row[0] and "é" in row[0] for row in quarantine)
    assert ("u2", "i2", "click", 2.5) in {row[:4] for row in lake_events}


def test_a_numeric_source_a_forgotten_user_and_chosen_dates_are_handled_as_spark_does(
    spark, make_config, tmp_path
) -> None:
    numbers = write_source(tmp_path / "numbers", NUMBERS, number_rows)
    (numbers / "day=2024-01-05").mkdir()  # a file without one event for the lake
    broken = pa.table({field.name: pa.nulls(1, field.type) for field in NUMBERS})
    pq.write_table(
        broken.set_column(4, "ts", pa.array([1.7e12])), numbers / "day=2024-01-05" / "part.parquet"
    )
    config = parquet_config(make_config, numbers, unit="ms")
    assert_driver_stages_what_spark_does(spark, config, tmp_path / "numbers_run")

    strings = parquet_config(make_config, write_source(tmp_path / "strings", STRINGS, string_rows))
    layout = StateLayout(tmp_path / "state")
    ErasureLedger(layout).record(["forget-me"], "")
    forgotten = ErasureLedger(layout).forgotten()
    assert forgotten is not None
    result, _, quarantine = assert_driver_stages_what_spark_does(
        spark,
        strings,
        tmp_path / "strings_run",
        dates={date(2024, 1, 2)},
        forgotten=(forgotten.salt, forgotten.user_hashes),
    )
    assert result.metrics["events_erased_at_ingest"] == 4
    assert not any("gone" in row[0] for row in quarantine)
    assert result.metrics["events_outside_window"] > 0


def test_sources_the_two_would_read_differently_go_to_spark(make_config, tmp_path) -> None:
    source = write_source(tmp_path / "source", STRINGS, string_rows)
    files = sorted(str(path) for path in source.rglob("*.parquet"))
    config = parquet_config(make_config, source)
    assert driver_source(config.source, files, 1000) is not None
    assert driver_source(config.source, files, 10) is None  # more rows than the driver takes
    text_time = pa.table(
        {"user": ["u1"], "item": ["i1"], "type": ["view"], "value": [1.0], "ts": ["1704196800"]}
    )
    for name, table in {
        "text_time": text_time,  # a timestamp Spark parses from text
        "float32": text_time.set_column(4, "ts", pa.array([1.7e9], pa.float32())),
        "other_schema": text_time.drop_columns(["value"]).set_column(3, "ts", pa.array([1], pa.int64())),
    }.items():
        folder = tmp_path / name / "day=2024-01-02"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part.parquet")
        if name == "other_schema":
            pq.write_table(text_time.set_column(4, "ts", pa.array([1], pa.int64())), folder / "more.parquet")
        paths = sorted(str(path) for path in folder.glob("*.parquet"))
        assert driver_source(parquet_config(make_config, tmp_path / name).source, paths, 1000) is None, name
    hour = tmp_path / "hour" / "hour=1.50"
    hour.mkdir(parents=True)
    pq.write_table(text_time.set_column(4, "ts", pa.array([1], pa.int64())), hour / "part.parquet")
    assert (
        driver_source(parquet_config(make_config, tmp_path / "hour").source, [str(hour / "part.parquet")], 9)
        is None
    )
    csv = make_config(**{"source.path": str(tmp_path / "events.csv")})
    assert driver_source(csv.source, [str(tmp_path / "events.csv")], 1000) is None


@pytest.mark.parametrize(
    ("number", "text"),
    [(1.0, "1.0"), (-0.0, "-0.0"), (1e7, "1.0E7"), (9999999.5, "9999999.5"), (0.001, "0.001"),
     (0.0001, "1.0E-4"), (123456789.125, "1.23456789125E8"), (-2.5e-310, "-2.5E-310"), (1e300, "1.0E300"),
     (float("nan"), "NaN"), (float("-inf"), "-Infinity")],
)  # fmt: skip
def test_doubles_read_as_text_as_java_writes_them(number: float, text: str) -> None:
    assert java_double_text(number) == text


def test_the_stage_ingests_a_small_parquet_source_on_the_driver_into_the_same_lake(
    spark, make_config, tmp_path
) -> None:
    source = write_source(tmp_path / "source", STRINGS, string_rows)
    lakes = []
    for name, limit in (("driver", 1000), ("spark", 0)):
        config = parquet_config(
            make_config,
            source,
            **{"spark.small_input_max_events": limit, "state_dir": str(tmp_path / name)},
        )
        run = RunContext.create(config, "recsys_weekly", "2024-01-01", "2024-01-08", name)
        metrics = run_ingest(spark, run)
        assert metrics["ingested_on_driver"] == float(name == "driver")
        lake = ds.dataset(str(run.layout.events_lake), format="parquet", partitioning="hive").to_table()
        quarantine = ds.dataset(str(run.quarantine_dir)).to_table().drop_columns(["ingested_at"])
        lakes.append(
            (
                sorted(tuple(row.values()) for row in lake.drop_columns(["ingested_at"]).to_pylist()),
                sorted(tuple(row.values()) for row in quarantine.to_pylist()),
                {key: value for key, value in metrics.items() if key != "ingested_on_driver"},
            )
        )
    assert lakes[0] == lakes[1]
    assert len(lakes[0][0]) == 14  # the weekly's history window takes the 2023 event too


def test_a_nights_job_over_a_small_parquet_source_starts_no_spark_session(
    own_weekly_run, tmp_path, caplog
) -> None:
    """The sample's events as Parquet: the night's ingest, ID maps, pairs and input fingerprint are
    all the driver's, so the job never starts a Spark context (whose start-up costs more than a
    night's work)."""
    ratings = pa_csv.read_csv(
        "data/ml-100k/u.data",
        read_options=pa_csv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=pa_csv.ParseOptions(delimiter="\t"),
    )
    (tmp_path / "source").mkdir()
    pq.write_table(ratings, tmp_path / "source" / "ratings.parquet")
    overrides = {
        **TEST_OVERRIDES,
        "state_dir": str(own_weekly_run.config.state_home),
        "source.path": str(tmp_path / "source"),
        "source.format": "parquet",
        "source.column_names": None,
    }
    caplog.set_level(logging.INFO)
    night = ["--interval-start", "1998-04-22T00:00:00+00:00", "--interval-end", "1998-04-23T00:00:00+00:00"]
    exit_code = run_spark_job(
        ["--dag-id", "recsys_nightly", "--job", INGEST_JOB, "--mode", "refresh", *night,
         "--run-id", "night", "--overrides-json", json.dumps(overrides)]
    )  # fmt: skip
    assert exit_code == 0, caplog.text
    done = json.loads(caplog.text.split(f"recsys-{INGEST_JOB} done: ", 1)[1].splitlines()[0])
    assert done["ingested_on_driver"] == 1.0 and done["pairs_aggregated_on_driver"] == 1.0
    assert done["events_read"] == 100_000 and done["spark_session_started"] == 0.0
