"""Replay history: the weekly DAG over a range of weeks, in date order and one run at a time, then a
report of what each week did or would have done.

Each week runs as a dry run (``dry_run``: published and gated, ``champion`` left alone) unless
promotion is asked for. Whether or not it promotes, a week is judged against the champion of its own
time (:func:`~recsys_pipeline.registry.reference_version`): the latest version with data no newer
than its own that was promoted or passed every gate, so the replay's earlier weeks judge its later
ones. The report (``report.html`` with PNG plots, and ``replay.json``) goes under
``<state>/reports/replay_<from>_<to>/`` and is logged to MLflow as a run of the configured experiment.
"""

from __future__ import annotations

import html
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from recsys_pipeline import registry, tracking
from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.runs import StateLayout, write_json

log = logging.getLogger(__name__)

WEEKLY = "recsys_weekly"
# What the report plots per week: evaluation with its confidence interval, and drift from the reference.
QUALITY = {
    "ndcg_at_10": "candidate",
    "baseline_ndcg_at_10": "popularity",
    "champion_ndcg_at_10": "version judged against",
}
DRIFT = ("drift_aligned_cosine", "drift_neighbour_overlap", "drift_rec_overlap")


class ReplayRangeError(RecsysError):
    """The replay's range holds no week."""


@dataclass
class ReplayedWeek:
    """One week of the replay: how its run ended and what it registered."""

    window_end: date
    succeeded: bool
    log: str
    version: int | None = None
    decision: str = ""
    reference_version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def week_ends(start: date, end: date) -> list[date]:
    """The ends of the weeks to replay: ``start``, then every seventh day up to ``end``."""
    if end < start:
        raise ReplayRangeError(f"--to {end} is before --from {start}: nothing to replay")
    return [start + timedelta(weeks=n) for n in range((end - start).days // 7 + 1)]


def airflow_dags_test(env: Mapping[str, str]) -> Callable[[str, date, dict[str, Any], Path], bool]:
    """Runs one DAG run in process with ``airflow dags test`` (its output to a log file)."""
    airflow = str(Path(sys.executable).parent / "airflow")

    def run(dag_id: str, day: date, conf: dict[str, Any], log_file: Path) -> bool:
        with log_file.open("w") as handle:
            command = [airflow, "dags", "test", dag_id, day.isoformat(), "-c", json.dumps(conf)]
            return subprocess.call(command, env=dict(env), stdout=handle, stderr=subprocess.STDOUT) == 0

    return run


def replay(
    config: PipelineConfig,
    start: date,
    end: date,
    promote: bool,
    run_dag: Callable[[str, date, dict[str, Any], Path], bool],
) -> Path:
    """Run the weekly DAG for each week ending from ``start`` to ``end``, in order, and write the
    report; returns its folder."""
    weeks = week_ends(start, end)
    folder = StateLayout(config.state_home).home / "reports" / f"replay_{start}_{end}"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    champion_before = champion_version(config)
    newest_before = max((row["version"] for row in registry_rows(config)), default=0)
    replayed = []
    for week_end in weeks:
        log_file = folder / "logs" / f"{WEEKLY}_{week_end}.log"
        print(f"{WEEKLY} for the week ending {week_end}: running (output in {log_file})", flush=True)
        succeeded = run_dag(WEEKLY, week_end, {} if promote else {"dry_run": True}, log_file)
        week = describe(config, week_end, succeeded, str(log_file), newest_before)
        print(f"{WEEKLY} for the week ending {week_end}: {week.decision}", flush=True)
        replayed.append(week)
    write_report(folder, config, start, end, promote, replayed, champion_before, champion_version(config))
    log_report(config, folder, start, end)
    return folder


def registry_rows(config: PipelineConfig) -> list[dict[str, Any]]:
    """Every registered version (none before the model's first)."""
    from mlflow.exceptions import MlflowException

    try:
        return registry.list_versions(config)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def champion_version(config: PipelineConfig) -> int | None:
    version = registry.alias_version(config, registry.CHAMPION)
    return None if version is None else int(version.version)


def describe(
    config: PipelineConfig, week_end: date, succeeded: bool, log_file: str, newest_before: int
) -> ReplayedWeek:
    """The week's outcome from what the registry holds: the version its run registered (the newest
    since the replay began whose data ends at the week's end) and why it was or was not promoted."""
    ends = week_end.isoformat()
    registered = [
        row
        for row in registry_rows(config)
        if row["version"] > newest_before
        and row["tags"].get("dag_id") == WEEKLY
        and row["tags"].get("data_interval_end", "").startswith(ends)
    ]
    week = ReplayedWeek(week_end, succeeded, log_file)
    if not registered:
        failure = StateLayout(config.state_home).last_failure
        reason = json.loads(failure.read_text()).get("message", "") if failure.is_file() else ""
        week.decision = f"failed before publishing: {reason}" if not succeeded else "registered nothing"
        return week
    row = max(registered, key=lambda candidate: candidate["version"])
    tags = row["tags"]
    week.version, week.metrics = row["version"], row["metrics"]
    reference = row["metrics"].get("reference_version")
    week.reference_version = None if reference is None else int(reference)
    if "promotion_reason" in tags:
        week.decision = f"promoted version {row['version']} to champion"
    elif tags.get(registry.WOULD_PROMOTE) == "true":
        week.decision = f"version {row['version']} passed every gate: would promote"
    elif tags.get("gates_failed"):
        week.decision = f"version {row['version']} failed: {tags['gates_failed']}"
    else:
        week.decision = f"version {row['version']} registered, run {'succeeded' if succeeded else 'failed'}"
    return week


def write_report(
    folder: Path,
    config: PipelineConfig,
    start: date,
    end: date,
    promote: bool,
    weeks: list[ReplayedWeek],
    champion_before: int | None,
    champion_after: int | None,
) -> None:
    summary = {
        "model": config.mlflow.model_name,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "promote": promote,
        "champion_before": champion_before,
        "champion_after": champion_after,
        "weeks": [{**asdict(week), "window_end": week.window_end.isoformat()} for week in weeks],
    }
    write_json(folder / "replay.json", summary)
    plots = plot_weeks(folder, weeks)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (
                week.window_end,
                "yes" if week.succeeded else "no",
                week.version or "",
                week.reference_version or "",
                _figure(week.metrics, "ndcg_at_10"),
                _figure(week.metrics, "champion_ndcg_at_10"),
                _figure(week.metrics, "drift_aligned_cosine"),
                _task_seconds(week.metrics),
                week.decision,
            )
        )
        + "</tr>"
        for week in weeks
    )
    alias = (
        "champion unchanged"
        if champion_before == champion_after
        else f"champion moved from version {champion_before} to version {champion_after}"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Replay {start} to {end}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>{html.escape(config.mlflow.model_name)}: replay of the weeks ending {start} to {end}</h1>
<p>{"Promotion on" if promote else "Dry runs (champion never moved)"}; {alias}.</p>
<table><tr><th>week ending</th><th>run succeeded</th><th>version</th><th>judged against</th>
<th>nDCG@10 (95% CI)</th><th>reference nDCG@10</th><th>aligned cosine</th><th>task seconds</th>
<th>decision</th></tr>{rows}</table>
{"".join(f'<h2>{html.escape(title)}</h2><img src="{name}">' for title, name in plots)}
</body></html>
"""
    (folder / "report.html").write_text(page)


def _task_seconds(metrics: Mapping[str, float]) -> str:
    seconds = [value for key, value in metrics.items() if key.startswith("stage_seconds_")]
    return f"{sum(seconds):.0f}" if seconds else ""


def _figure(metrics: Mapping[str, float], name: str) -> str:
    if name not in metrics:
        return ""
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    interval = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return f"{metrics[name]:.3f}{interval}"


def plot_weeks(folder: Path, weeks: list[ReplayedWeek]) -> list[tuple[str, str]]:
    """PNG plots over the replayed weeks: (title, file name) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dates = np.array([week.window_end.isoformat() for week in weeks], dtype="datetime64[D]")
    written = []
    figure, axis = plt.subplots(figsize=(8, 4))
    for name, label in QUALITY.items():
        values = [week.metrics.get(name, float("nan")) for week in weeks]
        axis.plot(dates, values, marker="o", label=label)
        low = [week.metrics.get(f"{name}_ci_low", float("nan")) for week in weeks]
        high = [week.metrics.get(f"{name}_ci_high", float("nan")) for week in weeks]
        axis.fill_between(dates, low, high, alpha=0.2)
    axis.set(title="evaluation on each week's holdout (95% CI)", xlabel="week ending", ylabel="nDCG@10")
    axis.legend()
    figure.autofmt_xdate()
    figure.savefig(folder / "quality.png", dpi=100)
    written.append(("Evaluation over time", "quality.png"))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4))
    for name in DRIFT:
        axis.plot(dates, [week.metrics.get(name, float("nan")) for week in weeks], marker="o", label=name)
    axis.set(title="drift from the version each week was judged against", xlabel="week ending")
    axis.legend()
    figure.autofmt_xdate()
    figure.savefig(folder / "drift.png", dpi=100)
    written.append(("Drift", "drift.png"))
    plt.close(figure)

    tasks = sorted({key for week in weeks for key in week.metrics if key.startswith("stage_seconds_")})
    figure, axis = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(weeks)
    labels = [week.window_end.isoformat() for week in weeks]
    for task in tasks:
        seconds = [week.metrics.get(task, 0.0) for week in weeks]
        axis.bar(labels, seconds, bottom=bottom, label=task.removeprefix("stage_seconds_"))
        bottom = [total + value for total, value in zip(bottom, seconds, strict=True)]
    axis.set(title="task wall seconds", xlabel="week ending", ylabel="seconds")
    if tasks:
        axis.legend(fontsize="small")
    figure.autofmt_xdate()
    figure.savefig(folder / "stages.png", dpi=100)
    written.append(("Stage times", "stages.png"))
    plt.close(figure)
    return written


def log_report(config: PipelineConfig, folder: Path, start: date, end: date) -> None:
    """The report as the artifacts of an MLflow run in the configured experiment."""
    bound = tracking.client(config)
    run = bound.create_run(
        tracking.experiment_id(bound, config),
        run_name=f"replay {start}..{end}",
        tags={"kind": "replay", "replay_from": start.isoformat(), "replay_to": end.isoformat()},
    )
    for name in ("report.html", "replay.json", "quality.png", "drift.png", "stages.png"):
        bound.log_artifact(run.info.run_id, str(folder / name), "replay")
    bound.set_terminated(run.info.run_id)
    log.info("replay report logged to MLflow run %s", run.info.run_id)
