"""Replay history: the weekly and nightly DAGs over a range of days, in date order and one run at a
time, then a report of what each run did or would have done.

The range's first day and every seventh day after it get a weekly run; the days between get a
nightly run (none with ``weekly_only``). A nightly that escalates hands over to a weekly run for the
same day, as the nightly DAG's trigger would under a scheduler. Each run is a dry run (``dry_run``:
published and gated, ``champion`` left alone) unless promotion is asked for. Either way a run is
judged against, and a nightly folds into, the champion of its own time
(:func:`~recsys_pipeline.registry.reference_version`): the latest version with data no newer than its
own that was promoted or passed every gate, so the replay's later runs build on its earlier ones. The
report (``report.html`` with PNG plots, and ``replay.json``) goes under
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
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from recsys_pipeline import registry, tracking
from recsys_pipeline.artifacts import RefreshRecord, RunArtifacts
from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import write_json
from recsys_pipeline.registry import Registry, VersionMark
from recsys_pipeline.runs import RunContext
from recsys_pipeline.state import StateLayout

log = logging.getLogger(__name__)

WEEKLY, NIGHTLY = "recsys_weekly", "recsys_nightly"
# What the report plots per weekly run: evaluation with its confidence interval (a nightly has no
# holdout), and per run the drift from the version it was judged against.
QUALITY = {
    "ndcg_at_10": "candidate",
    "baseline_ndcg_at_10": "popularity",
    "champion_ndcg_at_10": "version judged against",
}
DRIFT = ("drift_aligned_cosine", "drift_neighbour_retention", "drift_neighbour_overlap", "drift_rec_overlap")
PLOTS = ("quality.png", "drift.png", "champion.png", "stages.png")


class ReplayRangeError(RecsysError):
    """The replay's range holds no day."""


@dataclass
class ReplayedRun:
    """One DAG run of the replay: how it ended and what it registered."""

    dag_id: str
    window_end: date
    succeeded: bool
    log: str
    version: int | None = None
    decision: str = ""
    # The version it was judged against (weekly) or folded into (nightly).
    reference_version: int | None = None
    passed: bool = False  # promoted, or would have been
    escalated: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def planned_runs(start: date, end: date, weekly_only: bool) -> list[tuple[str, date]]:
    """(DAG, window end) in order: a weekly run on ``start`` and every seventh day after it up to
    ``end``, a nightly run on each day between (unless ``weekly_only``)."""
    if end < start:
        raise ReplayRangeError(f"--to {end} is before --from {start}: nothing to replay")
    days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    planned = [(WEEKLY if (day - start).days % 7 == 0 else NIGHTLY, day) for day in days]
    return [(dag_id, day) for dag_id, day in planned if dag_id == WEEKLY or not weekly_only]


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
    weekly_only: bool = False,
) -> Path:
    """Run the DAGs over the days from ``start`` to ``end`` (:func:`planned_runs`), in order, and
    write the report; returns its folder."""
    plan = planned_runs(start, end, weekly_only)
    folder = StateLayout.of(config).home / "reports" / f"replay_{start}_{end}"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    champion_before = champion_version(config)
    newest_before = max((row["version"] for row in registry_rows(config)), default=0)
    conf = {} if promote else {"dry_run": True}

    def run_one(dag_id: str, day: date, why: str = "") -> ReplayedRun:
        log_file = folder / "logs" / f"{dag_id}_{day}.log"
        print(f"{dag_id} for {day}{why}: running (output in {log_file})", flush=True)
        run = describe(
            config, dag_id, day, run_dag(dag_id, day, conf, log_file), str(log_file), newest_before
        )
        print(f"{dag_id} for {day}: {run.decision}", flush=True)
        return run

    replayed = []
    for dag_id, day in plan:
        replayed.append(run_one(dag_id, day))
        if replayed[-1].escalated:
            replayed.append(run_one(WEEKLY, day, ", the nightly's escalation"))
    write_report(folder, config, start, end, promote, replayed, champion_before, champion_version(config))
    log_report(config, folder, start, end)
    return folder


def registry_rows(config: PipelineConfig) -> list[dict[str, Any]]:
    """Every registered version (none before the model's first)."""
    from mlflow.exceptions import MlflowException

    try:
        return Registry(config).list_versions()
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def champion_version(config: PipelineConfig) -> int | None:
    version = Registry(config).alias_version(registry.CHAMPION)
    return None if version is None else int(version.version)


def describe(
    config: PipelineConfig, dag_id: str, day: date, succeeded: bool, log_file: str, newest_before: int
) -> ReplayedRun:
    """The run's outcome from what the registry holds: the version it registered (the newest since
    the replay began of its DAG whose data ends on its day) and why it was or was not promoted; for a
    nightly that registered nothing, whether its refresh escalated."""
    ends = day.isoformat()
    registered = [
        row
        for row in registry_rows(config)
        if row["version"] > newest_before
        and row["tags"].get("dag_id") == dag_id
        and row["tags"].get("data_interval_end", "").startswith(ends)
    ]
    run = ReplayedRun(dag_id, day, succeeded, log_file)
    if not registered:
        refresh = latest_refresh(config, day) if dag_id == NIGHTLY else None
        if succeeded and refresh is not None and refresh.escalate:
            run.escalated = True
            run.reference_version = int(refresh.derived_from_version)
            run.decision = f"escalated to a weekly run: {'; '.join(refresh.reasons)}"
            return run
        failure = StateLayout.of(config).last_failure
        reason = json.loads(failure.read_text()).get("message", "") if failure.is_file() else ""
        run.decision = f"failed before publishing: {reason}" if not succeeded else "registered nothing"
        return run
    row = max(registered, key=lambda candidate: candidate["version"])
    tags = row["tags"]
    run.version, run.metrics = row["version"], row["metrics"]
    reference = row["metrics"].get("reference_version", tags.get("derived_from_version"))
    run.reference_version = None if reference is None else int(reference)
    would_promote = tags.get(VersionMark.WOULD_PROMOTE) == "true"
    run.passed = VersionMark.PROMOTION_REASON in tags or would_promote
    if VersionMark.PROMOTION_REASON in tags:
        run.decision = f"promoted version {row['version']} to champion"
    elif would_promote:
        run.decision = f"version {row['version']} passed every gate: would promote"
    elif tags.get(VersionMark.GATES_FAILED):
        run.decision = f"version {row['version']} failed: {tags[VersionMark.GATES_FAILED]}"
    else:
        run.decision = f"version {row['version']} registered, run {'succeeded' if succeeded else 'failed'}"
    return run


def latest_refresh(config: PipelineConfig, day: date) -> RefreshRecord | None:
    """The refresh record of the newest nightly run for the day ending at ``day``, if it got that far."""
    end = datetime.combine(day, time(), UTC)
    window = RunContext.create(config, NIGHTLY, end - timedelta(days=1), end, mode="refresh").window_dir
    refreshed = [
        artifacts
        for artifacts in (RunArtifacts(folder, config.als) for folder in window.glob("*/"))
        if artifacts.refresh_dir.is_dir()
    ]
    latest = max(refreshed, key=lambda artifacts: artifacts.refresh_dir.stat().st_mtime, default=None)
    return None if latest is None else latest.refresh_record()


def champion_timeline(runs: list[ReplayedRun]) -> list[int | None]:
    """After each run, the version that was champion of its time: the run's own when it passed
    (promoted or would have), else the one before (at first, what the first run was judged against)."""
    current = runs[0].reference_version if runs else None
    timeline = []
    for run in runs:
        current = run.version if run.passed else current
        timeline.append(current)
    return timeline


def write_report(
    folder: Path,
    config: PipelineConfig,
    start: date,
    end: date,
    promote: bool,
    runs: list[ReplayedRun],
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
        "runs": [
            {**asdict(run), "window_end": run.window_end.isoformat(), "champion_of_its_time": champion}
            for run, champion in zip(runs, champion_timeline(runs), strict=True)
        ],
    }
    write_json(folder / "replay.json", summary)
    plots = plot_runs(folder, runs)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (
                run.window_end,
                run.dag_id.removeprefix("recsys_"),
                "yes" if run.succeeded else "no",
                run.version or "",
                run.reference_version or "",
                _figure(run.metrics, "ndcg_at_10"),
                _figure(run.metrics, "champion_ndcg_at_10"),
                _figure(run.metrics, "drift_aligned_cosine"),
                _task_seconds(run.metrics),
                run.decision,
            )
        )
        + "</tr>"
        for run in runs
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
<h1>{html.escape(config.mlflow.model_name)}: replay of {start} to {end}</h1>
<p>{"Promotion on" if promote else "Dry runs (champion never moved)"}; {alias}.</p>
<table><tr><th>window end</th><th>DAG</th><th>run succeeded</th><th>version</th>
<th>judged against / folded into</th><th>nDCG@10 (95% CI)</th><th>reference nDCG@10</th>
<th>aligned cosine</th><th>task seconds</th><th>decision</th></tr>{rows}</table>
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


def plot_runs(folder: Path, runs: list[ReplayedRun]) -> list[tuple[str, str]]:
    """PNG plots over the replayed runs: (title, file name) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def dates(selected: list[ReplayedRun]) -> np.ndarray:
        return np.array([run.window_end.isoformat() for run in selected], dtype="datetime64[D]")

    weekly = [run for run in runs if run.dag_id == WEEKLY]
    written = []
    figure, axis = plt.subplots(figsize=(8, 4))
    for name, label in QUALITY.items():
        axis.plot(dates(weekly), [run.metrics.get(name, np.nan) for run in weekly], marker="o", label=label)
        low = [run.metrics.get(f"{name}_ci_low", np.nan) for run in weekly]
        high = [run.metrics.get(f"{name}_ci_high", np.nan) for run in weekly]
        axis.fill_between(dates(weekly), low, high, alpha=0.2)
    axis.set(title="weekly runs: evaluation on each week's holdout (95% CI)", xlabel="week ending")
    axis.set(ylabel="nDCG@10")
    axis.legend()
    figure.autofmt_xdate()
    figure.savefig(folder / "quality.png", dpi=100)
    written.append(("Evaluation over time", "quality.png"))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4))
    for name in DRIFT:
        axis.plot(dates(runs), [run.metrics.get(name, np.nan) for run in runs], marker="o", label=name)
    axis.set(title="drift from the version each run was judged against", xlabel="window end")
    axis.legend()
    figure.autofmt_xdate()
    figure.savefig(folder / "drift.png", dpi=100)
    written.append(("Drift", "drift.png"))
    plt.close(figure)

    def numbers(versions: list[int | None]) -> np.ndarray:
        return np.array([np.nan if version is None else version for version in versions], dtype=float)

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.step(
        dates(runs),
        numbers(champion_timeline(runs)),
        where="post",
        color="grey",
        label="champion of its time",
    )
    for dag_id, marker in ((WEEKLY, "o"), (NIGHTLY, "^")):
        mine = [run for run in runs if run.dag_id == dag_id and run.version is not None]
        for passed, shape, outcome in ((True, marker, "passed"), (False, "x", "failed")):
            selected = [run for run in mine if run.passed == passed]
            if selected:
                versions = numbers([run.version for run in selected])
                axis.scatter(dates(selected), versions, marker=shape, label=f"{dag_id}: {outcome}")
    escalated = [run for run in runs if run.escalated]
    if escalated:
        folded = numbers([run.reference_version for run in escalated])
        axis.scatter(dates(escalated), folded, marker="s", label="escalated (at the version it folded into)")
    axis.set(title="alias moves: champion (or would-be champion) after each run", xlabel="window end")
    axis.set(ylabel="model version")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize="small")
    figure.autofmt_xdate()
    figure.savefig(folder / "champion.png", dpi=100)
    written.append(("Champion over time", "champion.png"))
    plt.close(figure)

    tasks = sorted({key for run in runs for key in run.metrics if key.startswith("stage_seconds_")})
    figure, axis = plt.subplots(figsize=(8, 4))
    bottom = np.zeros(len(runs))
    labels = [f"{run.window_end:%m-%d} {run.dag_id.removeprefix('recsys_')[0]}" for run in runs]
    for task in tasks:
        seconds = np.array([run.metrics.get(task, 0.0) for run in runs])
        axis.bar(labels, seconds, bottom=bottom, label=task.removeprefix("stage_seconds_"))
        bottom += seconds
    axis.set(title="task wall seconds per run (w weekly, n nightly)", xlabel="run", ylabel="seconds")
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
    for name in ("report.html", "replay.json", *PLOTS):
        bound.log_artifact(run.info.run_id, str(folder / name), "replay")
    bound.set_terminated(run.info.run_id)
    log.info("replay report logged to MLflow run %s", run.info.run_id)
