"""Every record read is accounted for, and a run uses exactly its own window's events (issue #14, 1-4)."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.dataset as ds
import pytest
from pyspark.sql import functions as F

from recsys_pipeline.erasure import ErasureLedger
from recsys_pipeline.events import EmptyIntervalError, QuarantineThresholdError
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.state import StateLayout
from tests.conftest import FIXTURES, ingest_staged

BAD_IDS = {
    "source.name": "bad-ids",
    "source.path": str(FIXTURES / "ratings_with_bad_ids.tsv"),
    "events.max_quarantine_share": 0.5,
}
WEEK = (datetime(1998, 4, 16, tzinfo=UTC), datetime(1998, 4, 23, tzinfo=UTC))


def accounted(metrics: dict[str, float]) -> float:
    return (
        metrics["events_ingested"]
        + metrics["events_quarantined"]
        + metrics["events_erased_at_ingest"]
        + metrics["events_outside_window"]
    )


def ingest_week(spark, config, staging, forgotten=None):
    """The fixture week of the configured source, classified (``forgotten``: salt and user hashes)."""
    return ingest_staged(spark, config, WEEK, datetime.now(UTC), staging, forgotten=forgotten)


def test_a_row_shifted_by_a_tab_in_an_id_is_quarantined_not_lost_outside_the_window(
    tmp_path, spark, make_config
) -> None:
    config = make_config(**BAD_IDS)
    result = ingest_week(spark, config, tmp_path / "staging")
    reasons = {row["reason"]: row["count"] for row in result.quarantine.groupBy("reason").count().collect()}
    # The shifted rows' "timestamp" column holds a rating (3, 4): far outside the window, yet the
    # record is broken, and its reason must win over the window filter.
    assert reasons.get("unparseable_record") == 2
    assert result.metrics["events_read"] == 24 == accounted(result.metrics)
    assert result.metrics["events_outside_window"] == 0


def test_a_forgotten_users_events_are_counted_as_erased_and_kept_nowhere(
    tmp_path, spark, make_config
) -> None:
    config = make_config(**BAD_IDS)
    request = ErasureLedger(StateLayout(tmp_path / "state")).record(["100"], "")
    forgotten = ErasureLedger(StateLayout(tmp_path / "state")).forgotten()
    assert forgotten is not None and len(request.user_hashes) == 1
    result = ingest_week(spark, config, tmp_path / "staging", (forgotten.salt, forgotten.user_hashes))
    assert result.metrics["events_erased_at_ingest"] == 4
    assert result.metrics["events_ingested"] == 16
    assert result.metrics["events_read"] == 24 == accounted(result.metrics)
    assert result.events.where(F.col("user_id") == "100").count() == 0
    assert result.quarantine.where(F.col("raw_record").contains("100\t")).count() == 0
    staged = ds.dataset(str(tmp_path / "staging"), format="parquet", partitioning="hive").to_table()
    assert "100" not in staged.column("user_id").to_pylist()


def test_overlong_ids_and_ids_with_control_characters_are_invalid(tmp_path, spark, make_config) -> None:
    config = make_config(**BAD_IDS)
    result = ingest_week(spark, config, tmp_path / "staging")
    invalid = result.quarantine.where(F.col("reason") == "invalid_id").collect()
    assert len(invalid) == 2 and result.metrics["quarantine_invalid_id"] == 2
    assert any("\\u0007" in row["raw_record"] or "\x07" in row["raw_record"] for row in invalid)
    assert result.metrics["events_ingested"] == 20
    shorter = make_config(**BAD_IDS, events__max_id_length=1000)
    kept = ingest_week(spark, shorter, tmp_path / "kept")
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


HALF_STARS = {
    "source.name": "half-stars",
    "source.path": str(FIXTURES / "ratings_half_stars.csv"),
    "source.format": "csv",
    "source.delimiter": ",",
    "source.header": True,
    "source.column_names": None,
    "source.mapping": {
        "user_id": "userId",
        "item_id": "movieId",
        "value": "rating",
        "timestamp": "timestamp",
    },
    "interactions.min_item_interactions": 1,
    "interactions.holdout.strategy": "days",
    "interactions.holdout.days": 2,  # the fixture spans five days
    "evaluation.min_users": 1,  # and has 30 users: this test counts pairs, it judges no model
}


def test_half_star_ratings_between_mapped_values_interpolate_instead_of_vanishing(spark, make_config) -> None:
    from recsys_pipeline.interactions import pair_confidences, supported

    config = make_config(interactions__min_item_interactions=1).interactions  # rating map 1:1 2:1 3:2 4:3 5:4
    events = spark.createDataFrame(
        [("u", f"i{n}", "rating", value) for n, value in enumerate([0.5, 1.0, 2.5, 3.0, 3.5, 4.5, 5.0])],
        "user_id string, item_id string, event_type string, value double",
    ).withColumn("event_ts", F.lit(datetime(1998, 4, 1, tzinfo=UTC)))
    confidence = {
        row.item_id: row.confidence
        for row in supported(pair_confidences(events, config, F.lit(WEEK[1])), config).collect()
    }
    assert confidence == pytest.approx(
        {"i0": 1.0, "i1": 1.0, "i2": 1.5, "i3": 2.0, "i4": 2.5, "i5": 3.5, "i6": 4.0}
    )


def test_every_aggregated_pair_is_kept_or_counted_with_its_reason(spark, make_config) -> None:
    config = make_config(**HALF_STARS)
    run = RunContext.create(config, "recsys_weekly", *WEEK, "manual__half")
    ingested = run_ingest(spark, run)
    assert ingested["events_read"] == 120 == accounted(ingested)
    from recsys_pipeline.stages.interactions import run_interactions

    metrics = run_interactions(spark, run)
    assert metrics["dropped_pairs_zero_confidence"] == 0  # no half star lost to an exact lookup
    kept = metrics["train_interactions"]
    dropped = sum(value for name, value in metrics.items() if name.startswith("dropped_pairs_"))
    assert kept + dropped == metrics["pairs_aggregated"] > 0
    # With item support required, the pairs it removes are counted under their own reason.
    strict = make_config(**{**HALF_STARS, "interactions.min_item_interactions": 12})
    stricter = RunContext.create(strict, "recsys_weekly", *WEEK, "manual__strict")
    counted = run_interactions(spark, stricter)
    assert counted["dropped_pairs_min_item_support"] > 0
    assert (
        counted["train_interactions"] + counted["dropped_pairs_min_item_support"]
        == counted["pairs_aggregated"]
    )


def test_pairs_left_without_confidence_fail_the_run_naming_the_setting(spark, make_config) -> None:
    from recsys_pipeline.interactions import EmptyInteractionsError
    from recsys_pipeline.stages.interactions import run_interactions

    unweighted = {**HALF_STARS, "interactions.event_weights.rating": {"weight": 0}}
    run = RunContext.create(make_config(**unweighted), "recsys_weekly", *WEEK, "manual__zero")
    run_ingest(spark, run)
    with pytest.raises(EmptyInteractionsError, match="zero confidence .*max_zero_confidence_share"):
        run_interactions(spark, run)
