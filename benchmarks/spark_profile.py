"""Where a Spark task's seconds go, read from the event logs every Spark session writes
(``<state>/spark-events``, see :func:`recsys_pipeline.spark.spark_session`).

One profile per Spark application (one per Spark task of a DAG run): its wall time, the time
inside Spark actions and the rest (JVM start-up, the driver's own Python work, waiting), and each
action (a SQL execution: a write, a count, a collect) with its label, seconds, rows read and
written, shuffle and spill. A stage names its actions with :func:`recsys_pipeline.spark.labelled`;
unlabelled ones show Spark's own call site.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

SQL_START = "org.apache.spark.sql.execution.ui.SparkListenerSQLExecutionStart"
SQL_END = "org.apache.spark.sql.execution.ui.SparkListenerSQLExecutionEnd"


def read_events(log_dir: Path) -> Iterator[dict[str, Any]]:
    """The events of one application's log folder (Spark 4 writes ``eventlog_v2_*``, zstd by default)."""
    for part in sorted(log_dir.glob("events_*")):
        compression = part.name.rsplit(".", 1)[-1] if "." in part.name else None
        with pa.OSFile(str(part)) as raw:
            stream = pa.CompressedInputStream(raw, compression) if compression else raw
            for line in stream.read().decode().splitlines():
                yield json.loads(line)


def application_profile(log_dir: Path) -> dict[str, Any]:
    started = ended = 0.0
    name = log_dir.name
    executions: dict[int, dict[str, Any]] = {}
    job_execution: dict[int, int] = {}
    stage_job: dict[int, int] = {}
    job_times: dict[int, list[float]] = {}
    metrics: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in read_events(log_dir):
        kind = event["Event"]
        if kind == "SparkListenerApplicationStart":
            name, started = event["App Name"], event["Timestamp"] / 1000
        elif kind == "SparkListenerApplicationEnd":
            ended = event["Timestamp"] / 1000
        elif kind == SQL_START:
            executions[event["executionId"]] = {
                "label": event.get("description", ""),
                "start": event["time"] / 1000,
                "end": event["time"] / 1000,
            }
        elif kind == SQL_END and event["executionId"] in executions:
            executions[event["executionId"]]["end"] = event["time"] / 1000
        elif kind == "SparkListenerJobStart":
            job = event["Job ID"]
            job_times[job] = [event["Submission Time"] / 1000, event["Submission Time"] / 1000]
            execution = (event.get("Properties") or {}).get("spark.sql.execution.id")
            if execution is not None:
                job_execution[job] = int(execution)
            for stage in event["Stage IDs"]:
                stage_job[stage] = job
        elif kind == "SparkListenerJobEnd" and event["Job ID"] in job_times:
            job_times[event["Job ID"]][1] = event["Completion Time"] / 1000
        elif kind == "SparkListenerTaskEnd" and event.get("Task Metrics"):
            job = stage_job.get(event["Stage ID"], -1)
            task = event["Task Metrics"]
            into = metrics[job_execution.get(job, -1 - job)]
            into["task_s"] += task.get("Executor Run Time", 0) / 1000
            into["input_rows"] += task.get("Input Metrics", {}).get("Records Read", 0)
            into["output_rows"] += task.get("Output Metrics", {}).get("Records Written", 0)
            into["shuffle_write_mb"] += (
                task.get("Shuffle Write Metrics", {}).get("Shuffle Bytes Written", 0) / 2**20
            )
            into["spill_mb"] += task.get("Disk Bytes Spilled", 0) / 2**20
    actions = []
    for execution, recorded in executions.items():
        actions.append(
            {"label": recorded["label"], "seconds": recorded["end"] - recorded["start"]} | metrics[execution]
        )
    # Jobs outside any SQL execution (RDD actions, schema inference when a reader lists files).
    for job, (start, end) in job_times.items():
        if job not in job_execution:
            actions.append({"label": "job outside SQL", "seconds": end - start} | metrics[-1 - job])
    in_actions = _covered(
        [(r["start"], r["end"]) for r in executions.values()]
        + [tuple(times) for job, times in job_times.items() if job not in job_execution]
    )
    wall = max(ended - started, 0.0)
    return {
        "application": name,
        "wall_s": round(wall, 2),
        "in_actions_s": round(in_actions, 2),
        "outside_actions_s": round(max(wall - in_actions, 0.0), 2),
        "actions": [
            {key: round(value, 2) if isinstance(value, float) else value for key, value in action.items()}
            for action in actions
        ],
    }


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals (actions may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile(events_dir: Path) -> list[dict[str, Any]]:
    """Every application logged under ``events_dir``, in the order they started."""
    return [application_profile(path) for path in sorted(events_dir.glob("eventlog_v2_*"))]


def print_profile(profiles: list[dict[str, Any]], top: int = 8) -> None:
    for application in profiles:
        print(
            f"  {application['application']}: {application['wall_s']:.0f} s, in actions "
            f"{application['in_actions_s']:.0f} s, outside {application['outside_actions_s']:.0f} s"
        )
        for action in sorted(application["actions"], key=lambda a: -a["seconds"])[:top]:
            print(
                f"    {action['seconds']:7.1f} s  {action['label'][:60]:<60} rows in "
                f"{action.get('input_rows', 0):>11.0f} out {action.get('output_rows', 0):>11.0f} "
                f"shuffle {action.get('shuffle_write_mb', 0):7.0f} MB"
            )
