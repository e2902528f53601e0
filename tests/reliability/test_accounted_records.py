"""Every record read is accounted for, and a run uses exactly its own window's events (issue #14, 1-4)."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.dataset as ds
import pytest
from pyspark.sql import functions as F

from recsys_pipeline.events import EmptyIntervalError, QuarantineThresholdError, ingest, read_source
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from tests.conftest import FIXTURES

BAD_IDS = {
    "source.name": "bad-ids",
    "source.path": str(FIXTURES / "ratings_with_bad_ids.tsv"),
    "events.max_quarantine_share": 0.5,
}
WEEK = (datetime(1998, 4, 16, tzinfo=UTC), datetime(1998, 4, 23, tzinfo=UTC))


def accounted(metrics: dict[str, float]) -> float:
    return metrics["events_ingested"] + metrics["events_quarantined"] + metrics["events_outside_window"]


def test_a_row_shifted_by_a_tab_in_an_id_is_quarantined_not_lost_outside_the_window(
    spark, make_config
) -> None:
    config = make_config(**BAD_IDS)
    result = ingest(read_source(spark, config.source), config.source, config.events, *WEEK, datetime.now(UTC))
    reasons = {row["reason"]: row["count"] for row in result.quarantine.groupBy("reason").count().collect()}
    # The shifted rows' "timestamp" column holds a rating (3, 4): far outside the window, yet the
    # record is broken, and its reason must win over the window filter.
    assert reasons.get("unparseable_record") == 2
    assert result.metrics["events_read"] == 24 == accounted(result.metrics)
    assert result.metrics["events_outside_window"] == 0


def test_overlong_ids_and_ids_with_control_characters_are_invalid(spark, make_config) -> None:
    config = make_config(**BAD_IDS)
    result = ingest(read_source(spark, config.source), config.source, config.events, *WEEK, datetime.now(UTC))
    invalid = result.quarantine.where(F.col("reason") == "invalid_id").collect()
    assert len(invalid) == 2 and result.metrics["quarantine_invalid_id"] == 2
    assert any("\\u0007" in row["raw_record"] or "\x07" in row["raw_record"] for row in invalid)
    assert result.metrics["events_ingested"] == 20
    shorter = make_config(**BAD_IDS, events__max_id_length=1000)
    kept = ingest(
        read_source(spark, shorter.source), shorter.source, shorter.events, *WEEK, datetime.now(UTC)
    )
    assert kept.metrics["quarantine_invalid_id"] == 1  # the long id is now allowed; the bell is not


def test_a_window_without_events_fails_instead_of_training_on_older_ones(spark, make_config) -> None:
    config = make_config()
    good = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__good")
    run_ingest(spark, good)
    # The source has nothing after 1998-04-22; the lake still holds every earlier week.
    empty = RunContext.create(config, "recsys_weekly", "1998-06-01", "1998-06-08", "manual__empty")
    with pytest.raises(EmptyIntervalError, match=r"no events .*1998-06-01.*1998-06-08.*source\.path"):
        run_ingest(spark, empty)


def test_a_failed_rerun_keeps_the_quarantine_of_the_earlier_run(spark, make_config) -> None:
    config = make_config(**BAD_IDS)
    first = RunContext.create(config, "recsys_weekly", *WEEK, "manual__first")
    run_ingest(spark, first)
    strict = make_config(**{**BAD_IDS, "events.max_quarantine_share": 0.01})
    rerun = RunContext.create(strict, "recsys_weekly", *WEEK, "manual__second")
    with pytest.raises(QuarantineThresholdError):
        run_ingest(spark, rerun)
    assert first.quarantine_dir != rerun.quarantine_dir
    assert ds.dataset(str(first.quarantine_dir)).to_table().num_rows == 4
    assert ds.dataset(str(rerun.quarantine_dir)).to_table().num_rows == 4
