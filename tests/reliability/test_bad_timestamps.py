"""One timestamp that cannot be a time is quarantined, never a failed job (issue #31, 1)."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.conftest import csv_events_source, ingest_staged

ROWS = [
    "u1,i1,view,1,880000000",
    "u1,i2,click,1,880000100",
    "u2,i1,view,1,880000200",
    "u2,i2,view,1,100000000000000000000",  # seconds: beyond the microseconds a long holds
    "u3,i1,view,1,Infinity",
    "u3,i2,view,1,-1e300",
    "u3,i3,view,1,NaN",
    "u4,i1,view,1,yesterday",
]


def test_timestamps_that_are_no_time_are_quarantined_and_every_row_is_accounted_for(
    tmp_path, spark, make_config
) -> None:
    source = tmp_path / "events.csv"
    source.write_text("user,item,type,value,ts\n" + "\n".join(ROWS) + "\n")
    config = make_config(**csv_events_source("overflow", source), events__max_quarantine_share=1.0)
    window = (datetime(1997, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC))
    result = ingest_staged(spark, config, window, datetime(2026, 1, 1, tzinfo=UTC), tmp_path / "staging")
    reasons = {row["reason"]: row["count"] for row in result.quarantine.groupBy("reason").count().collect()}
    assert reasons == {"invalid_timestamp": 3, "unparseable_timestamp": 2}
    assert result.metrics["quarantine_invalid_timestamp"] == 3
    assert result.metrics["events_ingested"] == 3 and result.metrics["events_read"] == len(ROWS)
    overflowing = result.quarantine.where("reason = 'invalid_timestamp'").collect()
    assert any("100000000000000000000" in row["raw_record"] for row in overflowing)
