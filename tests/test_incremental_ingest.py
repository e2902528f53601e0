"""A full run reads only the source files the lake has not taken in as they are now, and replaces
exactly the dates they touch; re-reading everything stays one setting away."""

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from recsys_pipeline.events import SourceMissingError, lake_signature, source_files
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest

DAY0 = datetime(2024, 3, 1, tzinfo=UTC)


def _day_file(folder: Path, name: str, day: int, users: int) -> None:
    stamp = int((DAY0 + timedelta(days=day, hours=2)).timestamp())
    rows = "".join(f"u{user},i{user % 3},view,{stamp + user}\n" for user in range(users))
    (folder / name).write_text("user,item,type,ts\n" + rows)


def _config(make_config, folder: Path, **overrides):
    return make_config(
        **{
            "source.path": str(folder),
            "source.delimiter": ",",
            "source.header": True,
            "source.column_names": None,
            "source.mapping": {"user_id": "user", "item_id": "item", "event_type": "type", "timestamp": "ts"},
            **overrides,
        }
    )


def _run(spark, make_config, folder: Path, end_day: int, **overrides) -> tuple[RunContext, dict[str, float]]:
    end = DAY0 + timedelta(days=end_day)
    run = RunContext.create(
        _config(make_config, folder, **overrides), "recsys_weekly", end - timedelta(days=7), end
    )
    metrics = run_ingest(spark, run)
    assert metrics["events_read"] == (
        metrics["events_ingested"] + metrics["events_quarantined"] + metrics["events_outside_window"]
    )
    return run, metrics


def _lake_days(run: RunContext) -> dict[str, int]:
    table = ds.dataset(str(run.layout.events_lake), format="parquet", partitioning="hive").to_table()
    return dict(Counter(str(day) for day in table.column("event_date").to_pylist()))


def test_weekly_runs_read_only_new_or_changed_files_and_replace_their_dates(
    spark, make_config, tmp_path: Path
) -> None:
    source = tmp_path / "events"
    source.mkdir()
    for day, users in ((0, 5), (1, 6), (2, 7)):
        _day_file(source, f"day{day}.csv", day, users)

    run, metrics = _run(spark, make_config, source, end_day=3)
    assert (metrics["source_files_read"], metrics["events_ingested"]) == (3, 18)
    assert _lake_days(run) == {"2024-03-01": 5, "2024-03-02": 6, "2024-03-03": 7}

    # The next week: one new day's file is all that is read.
    _day_file(source, "day3.csv", 3, 4)
    run, metrics = _run(spark, make_config, source, end_day=4)
    assert (metrics["source_files_read"], metrics["source_files_skipped"]) == (1, 3)
    assert metrics["events_read"] == 4 and metrics["events_in_interval"] == 22
    assert _lake_days(run)["2024-03-04"] == 4

    # Re-running reads nothing and changes nothing.
    run, metrics = _run(spark, make_config, source, end_day=4)
    assert metrics["source_files_read"] == 0 and len(_lake_days(run)) == 4

    # An upstream correction of one day re-reads that file only and replaces that day.
    _day_file(source, "day1.csv", 1, 2)
    run, metrics = _run(spark, make_config, source, end_day=4)
    assert metrics["source_files_read"] == 1
    assert _lake_days(run)["2024-03-02"] == 2

    # A late file with an event of an earlier day re-reads that day's file beside it: the day is
    # replaced from every file that has it, so nothing already in the lake goes missing.
    stamp = int((DAY0 + timedelta(days=2, hours=20)).timestamp())
    (source / "late.csv").write_text(f"user,item,type,ts\nlate,i0,view,{stamp}\n")
    run, metrics = _run(spark, make_config, source, end_day=4)
    assert metrics["source_files_read"] == 2 and _lake_days(run)["2024-03-03"] == 8

    # A file gone from the source takes its days out of the lake.
    (source / "day0.csv").unlink()
    run, metrics = _run(spark, make_config, source, end_day=4)
    assert metrics["source_files_removed"] == 1 and "2024-03-01" not in _lake_days(run)

    assert metrics["lake_dates_unchanged"] == 0

    # Settings that shape what a file becomes in the lake re-read every file when they change; the
    # dates whose events come out the same keep their files.
    before = lake_signature(run.layout.events_lake, (DAY0 + timedelta(days=4)).date())
    run, metrics = _run(spark, make_config, source, end_day=4, **{"events.max_id_length": 64})
    assert metrics["source_files_read"] == 4 and metrics["lake_dates_unchanged"] == 3
    assert lake_signature(run.layout.events_lake, (DAY0 + timedelta(days=4)).date()) == before

    # Re-reading everything is one setting.
    run, metrics = _run(spark, make_config, source, end_day=4, **{"events.incremental": False})
    assert metrics["source_files_read"] == 4
    assert _lake_days(run) == {"2024-03-02": 2, "2024-03-03": 8, "2024-03-04": 4}


def test_source_files_of_a_folder_a_glob_and_a_missing_path(make_config, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    for name in ("a.csv", "b.csv", "_SUCCESS", ".hidden.csv", "notes.txt"):
        (tmp_path / "logs" / name).write_text("x\n")

    def listed(path: Path) -> list[str]:
        return sorted(Path(p).name for p in source_files(make_config(**{"source.path": str(path)}).source))

    assert listed(tmp_path / "logs") == ["a.csv", "b.csv", "notes.txt"]
    assert listed(tmp_path / "logs" / "*.csv") == ["a.csv", "b.csv"]
    with pytest.raises(SourceMissingError, match="holds no file to read"):
        listed(tmp_path / "nothing-here")


def test_a_nightly_reads_only_the_new_days_files_and_the_next_weekly_takes_them_in(
    spark, make_config, tmp_path: Path
) -> None:
    source = tmp_path / "events"
    source.mkdir()
    for day, users in ((0, 5), (1, 6)):
        _day_file(source, f"day{day}.csv", day, users)
    _run(spark, make_config, source, end_day=2)

    _day_file(source, "day2.csv", 2, 3)
    nightly = RunContext.create(
        _config(make_config, source),
        "recsys_nightly",
        DAY0 + timedelta(days=2),
        DAY0 + timedelta(days=3),
        mode="refresh",
    )
    metrics = run_ingest(spark, nightly)
    assert (metrics["source_files_read"], metrics["events_ingested"]) == (1, 3)
    assert _lake_days(nightly) == {"2024-03-01": 5, "2024-03-02": 6, "2024-03-03": 3}

    night_end = (DAY0 + timedelta(days=3)).date()
    after_night = lake_signature(nightly.layout.events_lake, night_end)
    run, metrics = _run(spark, make_config, source, end_day=3)
    assert metrics["source_files_read"] == 1 and _lake_days(run)["2024-03-03"] == 3
    # The night's file holds the night's events as the lake has them: the day keeps its files (a pair
    # history built over it stays valid), and its events their first ingestion time.
    assert metrics["lake_dates_unchanged"] == 1
    assert lake_signature(run.layout.events_lake, night_end) == after_night
