"""Where a Spark task's seconds go, read from the event logs every Spark session writes
(``<state>/spark-events``, see :func:`recsys_pipeline.spark.spark_session`).

One profile per Spark application (one per Spark task of a DAG run): its wall time, the time
inside Spark actions and the rest (JVM start-up, the driver's own Python work, waiting), and each
action (a SQL execution: a write, a count, a collect) with its label, seconds, rows read and
written, shuffle and spill, and its ``operators``: where its tasks' time went, by kind of operator
and metric (a sort's sort time, an aggregate's build time, a scan, a whole-stage-code-generated
stage's duration, which holds the operators fused into it; operators of one kind in a plan, such as
a partial and a final aggregate, add up), from the SQL metrics its tasks reported. A
stage names its actions with :func:`recsys_pipeline.spark.label_actions`; unlabelled ones show
Spark's own call site.
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
# Adaptive execution replans an action as its stages finish; the new plan's operators carry new metrics.
SQL_REPLANNED = "org.apache.spark.sql.execution.ui.SparkListenerSQLAdaptiveExecutionUpdate"
TIMING_UNITS = {"timing": 1e3, "nsTiming": 1e9}  # a SQL timing metric's units per second
# An operator's metric below this many seconds of task time is left out of a profile by default.
MIN_OPERATOR_S = 0.5


def read_events(log_dir: Path) -> Iterator[dict[str, Any]]:
    """The events of one application's log folder (Spark 4 writes ``eventlog_v2_*``, zstd by default)."""
    for part in sorted(log_dir.glob("events_*")):
        compression = part.name.rsplit(".", 1)[-1] if "." in part.name else None
        with pa.OSFile(str(part)) as raw:
            stream = pa.CompressedInputStream(raw, compression) if compression else raw
            for line in stream.read().decode().splitlines():
                yield json.loads(line)


def timing_metrics(plan: dict[str, Any]) -> dict[int, tuple[str, float]]:
    """Every timing metric of a SQL plan: its accumulator id's "operator: metric" and units per second."""
    metrics = {
        metric["accumulatorId"]: (f"{plan['nodeName']}: {metric['name']}", TIMING_UNITS[metric["metricType"]])
        for metric in plan.get("metrics", [])
        if metric["metricType"] in TIMING_UNITS
    }
    for child in plan.get("children", []):
        metrics.update(timing_metrics(child))
    return metrics


def application_profile(log_dir: Path, min_operator_s: float = MIN_OPERATOR_S) -> dict[str, Any]:
    started = ended = 0.0
    name = log_dir.name
    executions: dict[int, dict[str, Any]] = {}
    job_execution: dict[int, int] = {}
    stage_job: dict[int, int] = {}
    job_times: dict[int, list[float]] = {}
    metrics: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    timings: dict[int, tuple[str, float]] = {}  # accumulator id: its operator and metric, units per s
    # Task seconds per (execution, operator and metric): the driver's own timings (a broadcast's wait
    # for the job that computes it) are left out. A task's metrics count for the action its job ran
    # for: an operator of a cached frame shows up in the plan of every later action that reads it.
    operators: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in read_events(log_dir):
        kind = event["Event"]
        if kind == "SparkListenerApplicationStart":
            name, started = event["App Name"], event["Timestamp"] / 1000
        elif kind == "SparkListenerApplicationEnd":
            ended = event["Timestamp"] / 1000
        elif kind == SQL_REPLANNED:
            timings.update(timing_metrics(event["sparkPlanInfo"]))
        elif kind == SQL_START:
            timings.update(timing_metrics(event["sparkPlanInfo"]))
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
            for update in event["Task Info"].get("Accumulables", []):
                if update["ID"] in timings:
                    metric, units = timings[update["ID"]]
                    operators[job_execution.get(job, -1 - job)][metric] += float(update["Update"]) / units
    actions = []
    for execution, recorded in executions.items():
        actions.append(
            {"label": recorded["label"], "seconds": recorded["end"] - recorded["start"]}
            | metrics[execution]
            | {"operators": top_operators(operators[execution], min_operator_s)}
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


def top_operators(seconds: dict[str, float], min_operator_s: float) -> dict[str, float]:
    """Operators' task seconds, largest first, those below ``min_operator_s`` left out."""
    return {
        name: round(value, 2)
        for name, value in sorted(seconds.items(), key=lambda item: -item[1])
        if value >= min_operator_s
    }


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals (actions may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile(events_dir: Path, min_operator_s: float = MIN_OPERATOR_S) -> list[dict[str, Any]]:
    """Every application logged under ``events_dir``, in the order they started."""
    return [application_profile(path, min_operator_s) for path in sorted(events_dir.glob("eventlog_v2_*"))]


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
            for name, seconds in list(action.get("operators", {}).items())[:4]:
                print(f"             {seconds:7.1f} s of tasks in {name}")
