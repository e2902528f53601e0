"""Honour an erasure request (the ``recsys_forget`` DAG): erase the users from the state, republish
the versions services load without them, then prove that no trace is left.

Each stage takes the request's id only: the ids themselves exist nowhere but as salted hashes in the
erasure ledger. Every stage erases everything any request recorded so far asked for, so re-running
one (or running an older request) is always safe.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_pipeline import tracking
from recsys_pipeline.bundle import write_erased_bundle
from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.erasure import (
    ErasureError,
    ErasureLedger,
    Forgotten,
    Verification,
    erase_rows,
    parquet_files,
    scrub_tree,
    tombstone_ids,
    tombstones,
    verify,
)
from recsys_pipeline.events import restore_lake
from recsys_pipeline.files import atomic_dir, write_json
from recsys_pipeline.registry import (
    CHAMPION,
    ERASURE_OF,
    ERASURE_REQUEST,
    PREVIOUS,
    Registry,
    VersionMark,
    VersionTags,
)
from recsys_pipeline.stages.publish import register_bundle
from recsys_pipeline.state import StateLayout

log = logging.getLogger(__name__)
FORGET_DAG = "recsys_forget"


class ErasureIncompleteError(ErasureError):
    """The verifier found a forgotten id after the erasure: the request is not honoured yet."""


def request_folder(layout: StateLayout, request_id: str) -> Path:
    """Where a request's erasure keeps what it did and its report (never the ids)."""
    return layout.home / "runs" / FORGET_DAG / request_id


def _forgotten(config: PipelineConfig, request_id: str) -> tuple[StateLayout, Forgotten]:
    layout = StateLayout.of(config)
    ledger = ErasureLedger(layout)
    ledger.request(request_id)  # a request nobody recorded fails here, before anything is touched
    forgotten = ledger.forgotten()
    assert forgotten is not None  # the request above is one
    return layout, forgotten


def run_state_erasure(config: PipelineConfig, request_id: str) -> dict[str, float]:
    """Erase the users from the state folder, under the state lock (no run reads or writes the lake,
    the ID maps or a run folder meanwhile):

    - the lake's files holding their events are rewritten without them (only those files);
      quarantine tables likewise, by the ids in the raw records;
    - their ids in the shared users' map become tombstones (the index stays taken);
    - every run folder (pair histories, matrices, model and bundle copies, reports) is scrubbed;
    - cached copies of published versions are removed (each holds the users).
    """
    layout, forgotten = _forgotten(config, request_id)
    started = time.perf_counter()
    with layout.lock():
        restore_lake(layout.events_lake)  # a date set aside by a crash would escape the erasure
        lake = erase_rows(parquet_files(layout.events_lake), ["user_id"], forgotten)
        quarantine = erase_rows(parquet_files(layout.quarantine), ["raw_record"], forgotten)
        tombstoned, user_tombstones = tombstone_ids(layout.id_maps / "users", forgotten)
        runs = scrub_tree(layout.home / "runs", forgotten, user_tombstones)
        logs = scrub_tree(layout.airflow_home / "logs", forgotten, user_tombstones)
        shutil.rmtree(layout.model_cache, ignore_errors=True)
    metrics = {
        "events_erased": float(lake.rows_removed),
        "lake_partitions_rewritten": float(len(lake.partitions)),
        "lake_files_rewritten": float(lake.files_rewritten),
        "lake_bytes_rewritten": float(lake.bytes_rewritten),
        "lake_bytes": float(lake.bytes_scanned),  # the lake's size before the rewrite
        "quarantine_records_erased": float(quarantine.rows_removed),
        "ids_tombstoned": float(tombstoned),
        "run_files_rewritten": float(len(runs.files_rewritten)),
        "run_rows_removed": float(runs.rows_removed),
        "log_files_rewritten": float(len(logs.files_rewritten)),
        "erase_state_s": time.perf_counter() - started,
    }
    write_json(request_folder(layout, request_id) / "state.json", metrics)
    log.info("erasure %s: %s", request_id, metrics)
    return metrics


def run_republish(config: PipelineConfig, request_id: str, airflow_run_id: str) -> dict[str, float]:
    """Republish without the users every version services may load (the champion, the previous
    champion, and a nightly's weekly parent, which the next nightly folds against), move the
    aliases onto the copies, then delete the artifacts of every other version (or the versions,
    with ``erasure.retain_versions: false``).

    A copy carries its parent's tags (``kind: erasure``, ``erasure_of``, ``erasure_request``), its
    metrics and gates; the champion moves to its copy only if it is still the version copied (a run
    promoted meanwhile fails this stage; re-running it copies the new champion).
    """
    layout, forgotten = _forgotten(config, request_id)
    registry = Registry(config)
    started = time.perf_counter()
    users_map = layout.id_maps / "users"
    user_tombstones = tombstones(pq.read_table(users_map)) if users_map.exists() else pa.array([], pa.int32())
    champion, previous = registry.alias_version(CHAMPION), registry.alias_version(PREVIOUS)
    served = [version for version in (champion, previous) if version is not None]
    parents = [
        registry.version(tags.lineage.parent_version)
        for tags in (VersionTags.of(version) for version in served)
        if tags.lineage is not None
    ]
    copies: dict[str, str] = {}
    # Weekly parents first: a nightly's copy names its parent's copy.
    for version in sorted(
        {str(v.version): v for v in [*parents, *served]}.values(), key=lambda v: int(v.version)
    ):
        copies[str(version.version)] = _erasure_copy(
            config, registry, layout, version, request_id, airflow_run_id, forgotten, user_tombstones, copies
        )
    if champion is not None:
        registry.promote(
            copies[str(champion.version)],
            reason=f"erasure {request_id} of version {champion.version}",
            judged_against=str(champion.version),
        )
    registry.point_previous(copies[str(previous.version)] if previous is not None else None)
    kept = set(copies.values())
    removed = 0
    for version in registry.all_versions():
        if str(version.version) in kept or version.tags.get(ERASED_BY) is not None:
            continue
        if config.erasure.retain_versions:
            registry.delete_run_artifacts(version.run_id)
            registry.client.set_model_version_tag(
                config.mlflow.model_name, str(version.version), ERASED_BY, request_id
            )
        else:
            registry.delete_version(str(version.version))
        removed += 1
    runs_cleared = _clear_other_runs(config, registry, forgotten, kept)
    # Copying downloaded (and cached) the versions copied: only the copies may stay cached.
    cache = layout.model_cache / config.mlflow.model_name
    for cached in cache.iterdir() if cache.is_dir() else []:
        if cached.name not in kept:
            shutil.rmtree(cached, ignore_errors=True)
    metrics = {
        "versions_republished": float(len(copies)),
        "versions_erased": float(removed),
        "runs_artifacts_deleted": float(runs_cleared),
        "champion_version": float(copies[str(champion.version)]) if champion is not None else -1.0,
        "republish_s": time.perf_counter() - started,
    }
    write_json(request_folder(layout, request_id) / "republish.json", {**metrics, "copies": copies})
    return metrics


# The tag an old version gets when its artifacts were deleted by an erasure request.
ERASED_BY = "artifacts_erased_by"


def _erasure_copy(
    config: PipelineConfig,
    registry: Registry,
    layout: StateLayout,
    version: Any,
    request_id: str,
    airflow_run_id: str,
    forgotten: Forgotten,
    user_tombstones: Any,
    copies: dict[str, str],
) -> str:
    parent = str(version.version)
    existing = registry.erasure_copy(parent, request_id)
    if existing is not None:
        return str(existing.version)
    bundle = registry.version_bundle(parent)
    # MLflow names a logged folder by its own name: the pyfunc loads it as "bundle".
    target = request_folder(layout, request_id) / "copies" / parent / "bundle"
    write_erased_bundle(
        bundle.path, target, forgotten, user_tombstones, {"request_id": request_id, "parent_version": parent}
    )
    left = verify([target], forgotten)
    if not left.clean:
        raise ErasureIncompleteError(
            f"the copy of version {parent} still names a forgotten user in {_places(left)}: not registered"
        )
    parent_tags = VersionTags.of(version)
    tags = {
        name: value
        for name, value in version.tags.items()
        if name not in {mark.value for mark in VersionMark} and name != ERASED_BY
    }
    tags.update(
        {
            "dag_id": FORGET_DAG,
            "airflow_run_id": airflow_run_id,
            "run_key": f"{parent_tags.run_key} erasure {request_id}",
            "kind": "erasure",
            ERASURE_OF: parent,
            ERASURE_REQUEST: request_id,
        }
    )
    if parent_tags.lineage is not None:  # a nightly's copy folds against its weekly parent's copy
        lineage = parent_tags.lineage
        tags["parent_version"] = copies.get(lineage.parent_version, lineage.parent_version)
        tags["derived_from_version"] = copies.get(lineage.derived_from_version, lineage.derived_from_version)
    status = registry.version_status(parent)

    def record() -> None:
        import mlflow

        mlflow.log_metrics(status["metrics"])
        gates = target / "gates.json"
        if gates.is_file():
            mlflow.log_dict(json.loads(gates.read_text()), "gates.json")

    copy = register_bundle(config, target, tags, tags["run_key"], record)
    registry.mark(copy, VersionMark.GATES_PASSED, version.tags.get(VersionMark.GATES_PASSED, "true"))
    log.info("erasure %s: version %s republished as %s", request_id, parent, copy)
    return copy


def _clear_other_runs(
    config: PipelineConfig, registry: Registry, forgotten: Forgotten, kept: set[str]
) -> int:
    """Delete the artifacts of any other run of the experiment (a rejected run's reports, say) that
    names a forgotten user; return how many."""
    import mlflow

    kept_runs = {registry.version(version).run_id for version in kept}
    cleared = 0
    with tracking.fluent(config) as bound:
        experiment = bound.get_experiment_by_name(config.mlflow.experiment)
        if experiment is None:
            return 0
        for run in bound.search_runs([experiment.experiment_id], max_results=5000):
            if run.info.run_id in kept_runs or not bound.list_artifacts(run.info.run_id):
                continue
            with tempfile.TemporaryDirectory() as staging:
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=staging)
                if not verify([Path(local)], forgotten).clean:
                    registry.delete_run_artifacts(run.info.run_id)
                    cleared += 1
    return cleared


def run_erasure_verification(config: PipelineConfig, request_id: str) -> dict[str, float]:
    """Scan the state folder and every artifact of the experiment for the forgotten ids; write the
    report (JSON and HTML, logged to MLflow) and record the erasure in the ledger, or fail naming
    where an id was found.

    The ledger folder (hashes and salt only) and the benchmark folder (synthetic sources, not state)
    are not scanned; neither is the source itself, which still holds the events by design (ingest
    erases them on the way in).
    """
    import mlflow

    layout, forgotten = _forgotten(config, request_id)
    started = time.perf_counter()
    skip = [layout.home / "erasure", layout.bench, config.source.path]
    with tempfile.TemporaryDirectory() as staging:
        artifacts = Path(staging)
        with tracking.fluent(config) as bound:
            experiment = bound.get_experiment_by_name(config.mlflow.experiment)
            runs = bound.search_runs([experiment.experiment_id], max_results=5000) if experiment else []
            for run in runs:
                if bound.list_artifacts(run.info.run_id):
                    mlflow.artifacts.download_artifacts(
                        run_id=run.info.run_id, dst_path=str(artifacts / run.info.run_id)
                    )
        state = verify([layout.home], forgotten, skip=skip)
        store = verify([artifacts], forgotten)
    metrics = {
        "verified_files": float(state.files_checked + store.files_checked),
        "verified_strings": float(state.strings_checked + store.strings_checked),
        "findings": float(len(state.findings) + len(store.findings)),
        "verify_s": time.perf_counter() - started,
    }
    folder = request_folder(layout, request_id)
    done = {
        name: json.loads((folder / f"{name}.json").read_text())
        for name in ("state", "republish")
        if (folder / f"{name}.json").is_file()
    }
    report = {
        "request_id": request_id,
        "users": len(ErasureLedger(layout).request(request_id).user_hashes),
        "erased": done,
        "checked": {
            "state folder": {
                "root": str(layout.home),
                "files": state.files_checked,
                "strings": state.strings_checked,
            },
            "artifact store": {
                "runs": len(runs),
                "files": store.files_checked,
                "strings": store.strings_checked,
            },
        },
        "findings": [finding.__dict__ for finding in [*state.findings, *store.findings]],
        "metrics": metrics,
    }
    with atomic_dir(folder / "report") as written:
        write_json(written / "report.json", report)
        (written / "report.html").write_text(report_html(report))
    with tracking.fluent(config) as bound:
        with mlflow.start_run(
            experiment_id=tracking.experiment_id(bound, config),
            run_name=f"erasure {request_id}",
            tags={"kind": "erasure_report", ERASURE_REQUEST: request_id},
        ):
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(str(folder / "report"), artifact_path="erasure_report")
    if not (state.clean and store.clean):
        raise ErasureIncompleteError(
            f"erasure {request_id} is not complete: a forgotten id is still in {_places(state, store)} "
            f"(report: {folder / 'report' / 'report.html'})"
        )
    ErasureLedger(layout).record_erased(request_id, metrics)
    return metrics


def _places(*verifications: Verification) -> str:
    found = [f"{finding.path} ({finding.where})" for v in verifications for finding in v.findings]
    return ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")


def report_html(report: dict[str, Any]) -> str:
    """The report as one HTML page: what each place lost, what was checked, what was found."""

    def rows(mapping: dict[str, Any]) -> str:
        return "".join(
            f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(json.dumps(value))}</td></tr>"
            for key, value in mapping.items()
        )

    findings = report["findings"]
    verdict = (
        "no forgotten id found" if not findings else f"{len(findings)} place(s) still name a forgotten user"
    )
    sections = "".join(
        f"<h2>{html.escape(name)}</h2><table>{rows(values)}</table>"
        for name, values in [*report["erased"].items(), *report["checked"].items()]
    )
    found = "".join(
        f"<tr><td>{html.escape(f['path'])}</td><td>{html.escape(f['where'])}</td><td>{f['count']}</td></tr>"
        for f in findings
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Erasure {html.escape(report['request_id'])}"
        f"</title></head><body><h1>Erasure {html.escape(report['request_id'])}</h1>"
        f"<p>{report['users']} user(s); verdict: <strong>{verdict}</strong></p>{sections}"
        f"<h2>Findings</h2><table><tr><th>file</th><th>where</th><th>ids</th></tr>{found}</table></body></html>"
    )
