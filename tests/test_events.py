import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.events import (
    LAKE_SCHEMA,
    FileSummary,
    QuarantineThresholdError,
    check_quarantine_share,
    copies_after_the_first,
    duplicate_records,
    ingest,
    lake_partitions,
    lake_signature,
    read_source,
    utc_date,
    with_file_ranks,
)
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from tests.conftest import FIXTURES, Staged, csv_events_source, ingest_staged, staged

BAD_SOURCE = csv_events_source("fixture", FIXTURES / "events_bad_records.csv")
WINDOW = (datetime(1997, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC))
INGESTED_AT = datetime(2026, 1, 1, tzinfo=UTC)
EXPECTED_REASONS = {
    "unparseable_record": 1,
    "missing_user_id": 1,
    "missing_item_id": 1,
    "unknown_event_type": 1,
    "invalid_value": 4,
    "unparseable_timestamp": 1,
    "before_floor": 1,
    "future_timestamp": 1,
    "duplicate": 1,
}


def ingest_source(
    spark: SparkSession, config: PipelineConfig, staging: Path, window: tuple[datetime, datetime] = WINDOW
) -> Staged:
    """The whole of ``config``'s source through :func:`ingest` over ``window``, staged in ``staging``."""
    return ingest_staged(spark, config, window, INGESTED_AT, staging)


def test_each_bad_record_kind_is_quarantined_with_its_reason(tmp_path, spark, make_config) -> None:
    config = make_config(**BAD_SOURCE)
    result = ingest_source(spark, config, tmp_path / "staging")

    reasons = {row["reason"]: row["count"] for row in result.quarantine.groupBy("reason").count().collect()}
    assert reasons == EXPECTED_REASONS
    for reason, count in EXPECTED_REASONS.items():
        assert result.metrics[f"quarantine_{reason}"] == count
    good = {(r.user_id, r.item_id, r.event_type) for r in result.events.collect()}
    assert good == {
        ("u1", "i1", "view"),
        ("u1", "i2", "purchase"),
        ("u2", "i1", "click"),
        ("u2", "i3", "rating"),
        ("u3", "i2", "watch"),
        ("u3", "i3", "view"),
    }
    assert result.metrics["events_read"] == 18
    assert result.metrics["events_ingested"] + result.metrics["events_quarantined"] == 18
    extra = result.quarantine.where(F.col("reason") == "unparseable_record").first()
    assert "EXTRA" in extra["raw_record"]
    watch = result.events.where(F.col("event_type") == "watch").first()
    assert watch["value"] == pytest.approx(120.5)
    assert watch["source"] == "fixture"


def test_a_repeated_event_keeps_the_copy_from_the_first_file_by_name(tmp_path, spark, make_config) -> None:
    source = tmp_path / "source"
    source.mkdir()
    header = "user,item,type,value,ts\n"
    # The same event three times (a timestamp written two ways parses to the same instant), and one
    # that differs only in its value.
    (source / "b.csv").write_text(header + "u1,i1,view,1,880000000.0\nu1,i1,view,2,880000000\n")
    (source / "a.csv").write_text(header + "u1,i1,view,1,880000000\nu1,i1,view,1,880000000.000\n")
    config = make_config(**csv_events_source("copies", source))
    result = ingest_source(spark, config, tmp_path / "staging")

    assert sorted(row["value"] for row in result.events.collect()) == [1.0, 2.0]
    duplicates = [json.loads(row["raw_record"]) for row in result.quarantine.collect()]
    # A copy in a.csv is kept: the later one in a.csv and the one in b.csv are the duplicates.
    assert sorted(Path(record["source_file"]).name for record in duplicates) == ["a.csv", "b.csv"]
    assert {(record["value"], record["event_ts"]) for record in duplicates} == {
        (1.0, "1997-11-20T04:26:40+00:00")
    }
    assert result.metrics["quarantine_duplicate"] == 2


def _without_file(record: str) -> str:
    fields = json.loads(record)
    fields.pop("source_file", None)
    return json.dumps(fields)


def test_each_task_stages_its_dates_unsorted_and_uncompressed(tmp_path, spark, make_config) -> None:
    # The project's Spark settings open a file per date a task holds (maxConcurrentOutputFileWriters):
    # a sort by date before the write held every row of a 100M-event weekly's tasks, spilling 2.5 GB.
    result = ingest_source(spark, make_config(**BAD_SOURCE), tmp_path / "staging")

    assert result.metrics["events_ingested"] == 6
    staged = sorted((tmp_path / "staging").glob("event_date=*/*.parquet"))
    assert len(staged) > 1
    for path in staged:
        metadata = pq.ParquetFile(path).metadata
        assert {
            metadata.row_group(group).column(column).compression
            for group in range(metadata.num_row_groups)
            for column in range(metadata.num_columns)
        } == {"UNCOMPRESSED"}
    executions = spark._jsparkSession.sharedState().statusStore().executionsList()
    (plan,) = [
        executions.apply(i).physicalPlanDescription()
        for i in range(executions.size())
        if executions.apply(i).description() == "ingest: classify and stage by date"
    ][-1:]
    assert "WriteFiles" in plan
    assert "Sort" not in plan


def test_a_parquet_sources_numbers_are_read_as_numbers_with_the_outcome_their_text_gives(
    tmp_path, spark, make_config
) -> None:
    # (user, item, type, value, ts): kept, repeated, a half star, a negative and a NaN value, no
    # value, a time beyond the timestamp range, no time, a time after ingest.
    rows = [
        ("u1", "i1", "view", 1.0, 880000000),
        ("u1", "i1", "view", 1.0, 880000000),
        ("u2", "i1", "rating", 4.5, 880000100),
        ("u2", "i2", "rating", -1.0, 880000200),
        ("u3", "i1", "view", float("nan"), 880000300),
        ("u3", "i2", "view", None, 880000400),
        ("u4", "i1", "view", 1.0, 10**18),
        ("u4", "i2", "view", 1.0, None),
        ("u5", "i1", "view", 2.0, 2000000000),
    ]
    columns = dict(zip(("user", "item", "type", "value", "ts"), zip(*rows, strict=True), strict=True))
    typed = tmp_path / "typed"
    typed.mkdir()
    pq.write_table(
        pa.table(
            {
                **columns,
                "value": pa.array(columns["value"], pa.float64()),
                "ts": pa.array(columns["ts"], pa.int64()),
            }
        ),
        typed / "events.parquet",
    )
    # The same events as text, as Spark writes these numbers as text.
    as_text = spark.read.parquet(str(typed)).selectExpr(
        *(f"cast({name} as string) as {name}" for name in columns)
    )
    as_text.coalesce(1).write.parquet(str(tmp_path / "text"))

    outcomes = []
    for name in ("typed", "text"):
        config = make_config(
            **csv_events_source(name, tmp_path / name),
            source__format="parquet",
            events__max_quarantine_share=1.0,
        )
        raw = read_source(spark, config.source)
        result = staged(
            spark,
            ingest(raw, config.source, config.events, *WINDOW, INGESTED_AT, tmp_path / f"staging_{name}"),
            tmp_path / f"staging_{name}",
        )
        outcomes.append(
            (
                sorted(tuple(row) for row in result.events.drop("source", "ingested_at").collect()),
                # Read from other files: a duplicate's record names its own.
                sorted(
                    (row["reason"], _without_file(row["raw_record"])) for row in result.quarantine.collect()
                ),
                dict(result.metrics),
            )
        )
        if name == "typed":
            assert raw.schema["value"].dataType.simpleString() == "double"
            assert raw.schema["ts"].dataType.simpleString() == "bigint"
    assert outcomes[0] == outcomes[1]
    events, quarantine, metrics = outcomes[0]
    assert len(events) == 3 and metrics["events_read"] == len(rows)
    assert [reason for reason, _ in quarantine] == [
        "duplicate",
        "future_timestamp",
        "invalid_timestamp",
        "invalid_value",
        "invalid_value",
        "unparseable_timestamp",
    ]
    # Records keep their numbers as text, as a text source's are.
    assert {"user": "u2", "item": "i2", "type": "rating", "value": "-1.0", "ts": "880000200"} in [
        json.loads(record) for _, record in quarantine
    ]


def test_a_row_names_its_file_by_rank_or_else_by_its_uri(spark) -> None:
    frame = spark.createDataFrame(
        [("u1", "file:///s/b.csv"), ("u2", "file:///s/a.csv"), ("u3", "file:///elsewhere.csv")],
        "user_id string, _source_file string",
    )
    ranked = with_file_ranks(frame, ["file:///s/a.csv", "file:///s/b.csv"])
    assert sorted(ranked.select("user_id", "_source_file_rank", "_source_file").collect()) == [
        ("u1", 1, None),
        ("u2", 0, None),
        # Not among the files listed: its URI stays, so that it is still counted against its file.
        ("u3", None, "file:///elsewhere.csv"),
    ]


def test_a_control_character_in_either_id_makes_the_event_invalid(tmp_path, spark, make_config) -> None:
    source = tmp_path / "source"
    source.mkdir()
    rows = ["u1,i1", "u\x07,i1", "u1,i\x85", "u\x7f,i2", "u2,i\x1f", "u2,i2"]
    (source / "ids.csv").write_text(
        "user,item,type,value,ts\n" + "".join(f"{ids},view,1,880000000\n" for ids in rows), encoding="utf-8"
    )
    config = make_config(**csv_events_source("ids", source), **{"events.max_quarantine_share": 1.0})
    result = ingest_source(spark, config, tmp_path / "staging")
    assert result.metrics["quarantine_invalid_id"] == 4
    assert sorted((r.user_id, r.item_id) for r in result.events.collect()) == [("u1", "i1"), ("u2", "i2")]


def test_an_events_utc_date_is_to_dates_either_side_of_the_epoch_and_of_midnight(spark) -> None:
    micros = (-86_400_000_001, -1, 0, 86_399_999_999, 86_400_000_000, 1_709_000_000_123_456)
    times = spark.createDataFrame([(m,) for m in micros], "micros long").select(
        F.timestamp_micros("micros").alias("ts")
    )
    pairs = times.select(utc_date(F.col("ts")).alias("arithmetic"), F.to_date("ts").alias("zoned")).collect()
    assert [row.arithmetic for row in pairs] == [row.zoned for row in pairs]
    assert pairs[0].arithmetic == date(1969, 12, 30) and pairs[1].arithmetic == date(1969, 12, 31)


def test_rows_outside_the_window_are_counted_not_quarantined(tmp_path, spark, make_config) -> None:
    config = make_config(**BAD_SOURCE)
    day = (datetime(1997, 11, 21, tzinfo=UTC), datetime(1997, 11, 22, tzinfo=UTC))
    result = ingest_source(spark, config, tmp_path / "staging", day)
    assert result.metrics["events_ingested"] == 0
    assert result.metrics["events_outside_window"] > 0
    assert (
        sum(result.metrics[k] for k in ("events_ingested", "events_quarantined", "events_outside_window"))
        == 18
    )


def test_a_source_with_no_row_in_the_window_ingests_nothing_and_accounts_for_every_row(
    tmp_path, spark, make_config
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "old.csv").write_text(
        "user,item,type,value,ts\nu1,i1,view,1,880000000\nu2,i1,view,1,880000100\n"
    )
    config = make_config(**csv_events_source("old", source))
    day = (datetime(1999, 1, 1, tzinfo=UTC), datetime(1999, 1, 2, tzinfo=UTC))
    result = ingest_source(spark, config, tmp_path / "staging", day)
    assert result.events.count() == 0 and result.quarantine.count() == 0
    assert result.metrics["events_read"] == 2 and result.metrics["events_outside_window"] == 2
    # The file put no date in the lake; its latest event, outside the window, is still known to the
    # ledger (which reads a file again when that event is later than the window that read it).
    assert result.files == {
        str(source / "old.csv"): FileSummary(frozenset(), datetime.fromtimestamp(880000100, UTC))
    }


def test_quarantine_threshold_names_the_top_reasons() -> None:
    metrics = {
        "quarantine_share": 0.4,
        "quarantine_invalid_value": 4.0,
        "quarantine_duplicate": 1.0,
        "quarantine_missing_user_id": 0.0,
    }
    with pytest.raises(QuarantineThresholdError, match=r"40\.0%.*invalid_value \(4\).*duplicate \(1\)"):
        check_quarantine_share(metrics, 0.05)
    check_quarantine_share(metrics, 0.5)


def test_failing_run_writes_quarantine_but_not_the_lake(spark, make_config) -> None:
    config = make_config(**BAD_SOURCE)
    run = RunContext.create(config, "test", *WINDOW)
    with pytest.raises(QuarantineThresholdError):
        run_ingest(spark, run)
    assert not run.layout.events_lake.exists()
    quarantine = ds.dataset(str(run.quarantine_dir)).to_table()
    assert quarantine.num_rows == sum(EXPECTED_REASONS.values())


def test_the_lake_holds_the_accepted_events_with_the_types_spark_reads(spark, make_config, tmp_path) -> None:
    config = make_config(**BAD_SOURCE, **{"events.max_quarantine_share": 1.0})
    run = RunContext.create(config, "test", *WINDOW)
    run_ingest(spark, run)
    expected = ingest_source(spark, config, tmp_path / "staging").events

    lake = spark.read.parquet(str(run.layout.events_lake))
    assert lake.schema.simpleString() == T._parse_datatype_string(LAKE_SCHEMA).simpleString()
    assert sorted(lake.drop("ingested_at", "event_date").collect()) == sorted(
        expected.drop("ingested_at").collect()
    )
    assert lake.count() == 6
    days = {row["event_date"] for row in lake.select("event_date").collect()}
    assert sorted(lake_partitions(run.layout.events_lake)) == sorted(days)


def _lake_rows(lake: Path) -> list[tuple]:
    table = ds.dataset(str(lake), format="parquet", partitioning="hive").to_table()
    rows = table.drop_columns(["ingested_at"]).to_pylist()
    return sorted(tuple(sorted(row.items())) for row in rows)


def test_reingesting_an_interval_overwrites_its_partitions_without_duplicates(spark, make_config) -> None:
    config = make_config(**{"interactions.history_days": 30})
    run = RunContext.create(config, "test", "1998-03-24", "1998-03-31")
    run_ingest(spark, run)
    first = _lake_rows(run.layout.events_lake)
    files_first = sorted(
        p.relative_to(run.layout.events_lake).parent for p in run.layout.events_lake.rglob("*.parquet")
    )
    run_ingest(spark, run)
    assert _lake_rows(run.layout.events_lake) == first
    files_second = sorted(
        p.relative_to(run.layout.events_lake).parent for p in run.layout.events_lake.rglob("*.parquet")
    )
    assert files_second == files_first
    dates = {dict(row)["event_date"] for row in first}
    assert min(map(str, dates)) >= "1998-03-01" and max(map(str, dates)) <= "1998-03-30"
    assert len(first) > 1000


def test_a_date_a_crash_left_set_aside_is_back_after_the_next_ingest(spark, make_config) -> None:
    config = make_config(**{"interactions.history_days": 30})
    run = RunContext.create(config, "test", "1998-03-24", "1998-03-31")
    run_ingest(spark, run)
    lake = run.layout.events_lake
    first = _lake_rows(lake)
    # Kills during a date's copy: one date set aside with nothing in its place, another already
    # replaced with the old copy still aside, a third copy never swapped in.
    (lake / "event_date=1998-03-20").rename(lake / ".event_date=1998-03-20.old-0badf00d")
    shutil.copytree(lake / "event_date=1998-03-21", lake / ".event_date=1998-03-21.old-0badf00d")
    shutil.copytree(lake / "event_date=1998-03-22", lake / ".event_date=1998-03-22.tmp-0badf00d")

    run_ingest(spark, run)  # the source is unchanged: nothing is read again
    assert _lake_rows(lake) == first
    assert not list(lake.glob(".*"))


def test_reingesting_a_shrunken_source_leaves_no_stale_dates(spark, make_config, tmp_path: Path) -> None:
    config = make_config(**{"interactions.history_days": 30})
    run = RunContext.create(config, "test", "1998-03-24", "1998-03-31")
    run_ingest(spark, run)
    lines = (config.source.path).read_text().splitlines()
    # One day from the history and one from the run's own interval (an interval without events fails).
    one_day = [
        line
        for line in lines
        if 890_000_000 <= int(line.split("\t")[3]) < 890_086_400
        or 890_784_000 <= int(line.split("\t")[3]) < 890_870_400
    ]
    shrunken = tmp_path / "u.data"
    shrunken.write_text("\n".join(one_day) + "\n")
    smaller = RunContext.create(
        config.model_copy(update={"source": config.source.model_copy(update={"path": shrunken})}),
        "test",
        "1998-03-24",
        "1998-03-31",
    )
    run_ingest(spark, smaller)
    rows = _lake_rows(run.layout.events_lake)
    assert len(rows) == len(one_day)
    expected_dates = {str(datetime.fromtimestamp(int(line.split("\t")[3]), UTC).date()) for line in one_day}
    assert {str(dict(row)["event_date"]) for row in rows} == expected_dates
    assert expected_dates == {"1998-03-15", "1998-03-16", "1998-03-25"}


def test_the_lake_signature_before_a_day_changes_only_when_an_earlier_day_is_rewritten(tmp_path) -> None:
    lake = tmp_path / "events"
    for day in ("1998-03-19", "1998-03-20", "1998-03-21"):
        (lake / f"event_date={day}").mkdir(parents=True)
        (lake / f"event_date={day}" / "part-0.parquet").write_bytes(b"events of " + day.encode())
    before = date(1998, 3, 21)
    signature = lake_signature(lake, before)
    (lake / "event_date=1998-03-21" / "part-0.parquet").write_bytes(b"the day itself, ingested again")
    assert lake_signature(lake, before) == signature
    (lake / "event_date=1998-03-19" / "part-0.parquet").write_bytes(b"an earlier day, ingested again")
    assert lake_signature(lake, before) != signature


def test_only_valid_copies_after_the_first_by_file_rank_are_duplicates() -> None:
    stamp = datetime(1997, 11, 20, tzinfo=UTC)
    # (user, value, with a time, reason, file rank) of rows of one date, in the order they were staged.
    rows = [
        ("u1", 1.0, True, None, 1),  # a copy of the next row, from a later file: the duplicate
        ("u1", 1.0, True, None, 0),  # kept: the first file's
        ("u1", 1.0, True, None, 0),  # the same file again: a duplicate
        ("u1", 2.0, True, None, 0),  # another value: another event
        ("u2", None, True, "invalid_value", 0),  # quarantined: not the first copy of the next row
        ("u2", None, True, None, 1),  # kept (no value is a value too)
        ("u2", None, True, None, 2),  # a duplicate
        ("u3", 1.0, False, "unparseable_timestamp", 0),  # quarantined rows are never duplicates
        ("u3", 1.0, False, "unparseable_timestamp", 0),
    ]
    table = pa.table(
        {
            "user_id": [row[0] for row in rows],
            "item_id": ["i1"] * len(rows),
            "event_type": ["view"] * len(rows),
            "value": pa.array([row[1] for row in rows], pa.float64()),
            "event_ts": pa.array([stamp if row[2] else None for row in rows], pa.timestamp("us", tz="UTC")),
            "reason": pa.array([row[3] for row in rows], pa.string()),
            "raw_record": pa.nulls(len(rows), pa.string()),
            "_source_file": pa.nulls(len(rows), pa.string()),
            "_source_file_rank": pa.array([row[4] for row in rows], pa.int32()),
        }
    )
    duplicate = copies_after_the_first(table)
    assert list(np.flatnonzero(duplicate)) == [0, 2, 6]
    assert not copies_after_the_first(table.slice(3, 3)).any()

    names = ["file:///in/a.csv", "file:///in/b.csv", "file:///in/c.csv"]
    marked = duplicate_records(table, duplicate, names)
    assert marked.column("reason").to_pylist()[:3] == ["duplicate", None, "duplicate"]
    assert json.loads(marked.column("raw_record")[0].as_py()) == {
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "view",
        "value": 1.0,
        "event_ts": "1997-11-20T00:00:00+00:00",
        "source_file": "/in/b.csv",
    }
    assert json.loads(marked.column("raw_record")[6].as_py())["source_file"] == "/in/c.csv"
