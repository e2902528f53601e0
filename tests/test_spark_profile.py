"""The benchmarks' Spark profile, read from the event log of a real Spark job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.spark_profile import profile
from recsys_pipeline.spark import driver_java_options, exercise_command


# The slow tier's: it starts a spark-submit job, 30-40 s of `make test` for a benchmark's tool.
@pytest.mark.slow
def test_each_action_reports_where_its_tasks_time_went_operator_by_operator(tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.mkdir()
    logging = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri()}
    command = exercise_command(
        driver_java_options("", tmp_path / "no-archive.jsa"), tmp_path / "work", logging
    )
    # spark-submit finds Spark through this interpreter's pyspark.
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    (application,) = profile(events, min_operator_s=0.0)
    actions = application["actions"]
    operators = {name for action in actions for name in action.get("operators", {})}
    # The job's window sorts its rows, its aggregates hash them, and it reads Parquet back.
    expected = {"Sort: sort time", "HashAggregate: time in aggregation build", "Scan parquet : scan time"}
    assert expected <= operators
    for action in actions:
        for seconds in action.get("operators", {}).values():
            # An operator's time is part of its tasks' run time (both summed over the action's tasks).
            assert 0.0 <= seconds <= action.get("task_s", 0.0) + 0.01
