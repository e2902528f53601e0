"""Publish one complete bundle per run to the MLflow registry and move aliases only through gates.

Bundle layout (the ``bundle`` artifact of the registered pyfunc model)::

    bundle.json                  format version, model name, data window, counts
    embeddings/{user,item}_factors.parquet
    id_maps/{users,items}.parquet   (id STRING, idx INT)
    history.parquet              (user_idx, item_idx) training interactions, to exclude seen items
    popularity.npy               training interactions per item, for the popular-items fallback
    recommendations.parquet      precomputed top-N for active users (user_id, rank, item_id, score)
    index/                       ScaNN index with manifest.json
    metrics.json, gates.json, lineage.json
    validation/                  GX suites, results and Data Docs
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from recsys_pipeline.als import Embeddings, read_embeddings
from recsys_pipeline.config import PROJECT_ROOT, PipelineConfig
from recsys_pipeline.runs import RunContext, StateLayout, atomic_dir, now_utc, write_json
from recsys_pipeline.tables import read_id_map, read_matrix

log = logging.getLogger(__name__)
BUNDLE_FORMAT = 1
CHAMPION, PREVIOUS = "champion", "previous"
REQUIRED_GATES = {
    "full": ("evaluation", "index", "validation"),
    # A fold-in has no untouched holdout to evaluate on; its gate is staying close to its parent.
    "refresh": ("refresh", "index", "validation"),
}
REFRESH_TAGS = (
    "parent_version",
    "derived_from_version",
    "refresh_day",
    "users_updated",
    "users_added",
    "items_added",
    "refresh_s",
)


class GateFailedError(RuntimeError):
    """A gate did not pass, so the champion alias was left where it was."""


class NothingPublishedError(LookupError):
    """The registry holds no version behind the requested alias."""


def mlflow_client(config: PipelineConfig) -> Any:
    """A client bound to the configured tracking server (or the embedded SQLite store)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    if config.mlflow.tracking_uri is None:
        StateLayout(config.state_home).mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    return MlflowClient(config.tracking_uri, config.tracking_uri)


def experiment_id(client: Any, config: PipelineConfig) -> str:
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    if experiment is not None:
        return str(experiment.experiment_id)
    # The embedded store keeps artifacts beside its database; a tracking server decides for itself.
    location = (
        StateLayout(config.state_home).mlflow_artifacts.as_uri()
        if config.mlflow.tracking_uri is None
        else None
    )
    return str(client.create_experiment(config.mlflow.experiment, artifact_location=location))


def _code_version() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return version("recsys-pipeline")


def run_tags(run: RunContext) -> dict[str, str]:
    fingerprint = (run.stage_dir("interactions") / "fingerprint.txt").read_text().strip()
    trained = json.loads((run.stage_dir("model") / "params.json").read_text())
    return {
        "dag_id": run.dag_id,
        "airflow_run_id": run.run_id,
        "run_key": run.run_key,
        "data_interval_start": run.interval_start.isoformat(),
        "data_interval_end": run.interval_end.isoformat(),
        "input_fingerprint": fingerprint,
        "code_version": _code_version(),
        "backend": trained["backend"],
        "bundle_format": str(BUNDLE_FORMAT),
        "kind": run.mode,
        **refresh_tags(run),
    }


def refresh_tags(run: RunContext) -> dict[str, str]:
    """A refreshed version's lineage: its weekly parent, the day folded in, counts and time."""
    path = run.stage_dir("refresh") / "refresh.json"
    if run.mode != "refresh" or not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return {name: str(record[name]) for name in REFRESH_TAGS}


def build_bundle(run: RunContext) -> Path:
    """Assemble the run's outputs into one folder a service can load on its own."""
    interactions = run.stage_dir("interactions")
    target = run.stage_dir("bundle")
    with atomic_dir(target) as staging:
        shutil.copytree(run.stage_dir("model"), staging / "embeddings")
        shutil.copytree(run.stage_dir("index"), staging / "index")
        shutil.copytree(run.stage_dir("validation"), staging / "validation")
        (staging / "id_maps").mkdir()
        for name in ("users", "items"):
            (part,) = sorted((interactions / "maps" / name).glob("*.parquet"))
            shutil.copy(part, staging / "id_maps" / f"{name}.parquet")
        train = read_matrix(interactions / "train")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table(
                {"user_idx": train.user_idx.astype(np.int32), "item_idx": train.item_idx.astype(np.int32)}
            ),
            staging / "history.parquet",
        )
        n_items = pq.ParquetFile(staging / "id_maps" / "items.parquet").metadata.num_rows
        np.save(staging / "popularity.npy", np.bincount(train.item_idx, minlength=n_items))
        recommendations = run.stage_dir("recommendations") / "recommendations.parquet"
        if recommendations.is_file():
            shutil.copy(recommendations, staging / "recommendations.parquet")
        write_json(staging / "metrics.json", run.read_metrics())
        write_json(staging / "gates.json", run.read_gates())
        write_json(
            staging / "lineage.json",
            {"tags": run_tags(run), "config": run.config.resolved(), "source": str(run.config.source.path)},
        )
        write_json(
            staging / "bundle.json",
            {
                "format_version": BUNDLE_FORMAT,
                "model_name": run.config.mlflow.model_name,
                "data_interval": [run.interval_start.isoformat(), run.interval_end.isoformat()],
                "created_at": now_utc().isoformat(),
            },
        )
    return target


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, child in value.items():
            flat.update(_flatten(f"{prefix}.{key}" if prefix else str(key), child))
        return flat
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def _trained_params(run: RunContext) -> dict[str, str]:
    """The hyperparameters the model was trained with (``als.*`` holds the config, before any sweep)."""
    model_dir = run.stage_dir("model")
    params = _flatten("trained", json.loads((model_dir / "params.json").read_text()))
    sweep = model_dir / "sweep.json"
    if sweep.is_file():
        params["trained.sweep_run_id"] = str(json.loads(sweep.read_text())["mlflow_run_id"])
    return params


def find_version(client: Any, model_name: str, tags: dict[str, str]) -> Any | None:
    """The version already registered for this run and input, if any."""
    query = (
        f"name = '{model_name}' and tags.run_key = '{tags['run_key']}' "
        f"and tags.input_fingerprint = '{tags['input_fingerprint']}'"
    )
    versions = client.search_model_versions(query)
    return max(versions, key=lambda v: int(v.version)) if versions else None


def run_publish(run: RunContext) -> str:
    """Log the run and register its bundle as a new model version (or return the one already there)."""
    import mlflow

    from recsys_pipeline.serving import RecsysPyfunc, model_signature

    config = run.config
    client = mlflow_client(config)
    tags = run_tags(run)
    existing = find_version(client, config.mlflow.model_name, tags)
    if existing is not None:
        log.info("run %s already published as version %s", tags["run_key"], existing.version)
        return str(existing.version)
    bundle = build_bundle(run)
    metrics = run.read_metrics()
    losses = json.loads((run.stage_dir("model") / "training_loss.json").read_text())
    with mlflow.start_run(experiment_id=experiment_id(client, config), run_name=tags["run_key"], tags=tags):
        mlflow.log_params(_flatten("", config.resolved()))
        mlflow.log_params(_trained_params(run))
        mlflow.log_metrics(metrics)
        for step, loss in enumerate(losses):
            mlflow.log_metric("training_loss_per_iteration", loss, step=step)
        mlflow.log_artifacts(str(run.stage_dir("validation")), artifact_path="validation")
        mlflow.log_dict(run.read_gates(), "gates.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=RecsysPyfunc(),
            artifacts={"bundle": str(bundle)},
            signature=model_signature(),
            input_example=_input_example(bundle),
            pip_requirements=_serving_requirements(),
        )
    version = mlflow.register_model(info.model_uri, config.mlflow.model_name, tags=tags)
    log.info("registered %s version %s", config.mlflow.model_name, version.version)
    return str(version.version)


def log_rejected_run(run: RunContext, reason: str) -> str:
    """Log a run that failed validation (metrics incl. drift, gates, Data Docs); register nothing."""
    import mlflow

    client = mlflow_client(run.config)
    tags = {**run_tags(run), "rejected": reason[:5000]}
    with mlflow.start_run(
        experiment_id=experiment_id(client, run.config), run_name=f"{tags['run_key']} (rejected)", tags=tags
    ) as active:
        mlflow.log_params(_flatten("", run.config.resolved()))
        mlflow.log_metrics(run.read_metrics())
        mlflow.log_artifacts(str(run.stage_dir("validation")), artifact_path="validation")
        mlflow.log_dict(run.read_gates(), "gates.json")
    return str(active.info.run_id)


def _input_example(bundle: Path) -> Any:
    import pandas as pd

    from recsys_pipeline.als import read_factors

    user_idx, _ = read_factors(bundle / "embeddings" / "user_factors.parquet")
    user_id = read_id_map(bundle / "id_maps" / "users.parquet")[user_idx[0]]
    return pd.DataFrame({"user_id": [user_id], "k": [10]})


def _serving_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in (
            "mlflow",
            "scann",
            "pyarrow",
            "pandas",
            "numpy",
            "scipy",
            "pydantic",
            "pyyaml",
            "threadpoolctl",
        )
    ]


def _wait_until_ready(client: Any, name: str, version: str, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while (status := client.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise GateFailedError(f"{name} version {version} is {status}, not READY: not promoted")
        time.sleep(1)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(config: PipelineConfig, version: str, reason: str) -> None:
    """Point ``champion`` at ``version``; the version it replaces keeps ``previous``."""
    client = mlflow_client(config)
    name = config.mlflow.model_name
    _wait_until_ready(client, name, version)
    current = alias_version(client, name, CHAMPION)
    if current is not None and str(current.version) == str(version):
        return
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    log.info("%s@%s -> version %s (%s)", name, CHAMPION, version, reason)


def run_promotion(run: RunContext, version: str) -> str:
    """Promote the run's version only if every gate recorded for the run passed."""
    gates = run.read_gates()
    failed = [
        f"{gate}: {'; '.join(gates[gate]['reasons']) or 'not run'}"
        for gate in REQUIRED_GATES[run.mode]
        if not gates.get(gate, {}).get("passed", False)
    ]
    client = mlflow_client(run.config)
    client.set_model_version_tag(
        run.config.mlflow.model_name, version, "gates_passed", str(not failed).lower()
    )
    if failed:
        raise GateFailedError(f"version {version} not promoted; failed gates: {' | '.join(failed)}")
    promote(run.config, version, reason=f"gates passed in {run.dag_id} {run.interval_key}")
    return version


def download_bundle(config: PipelineConfig, alias: str = CHAMPION) -> tuple[Any, Path]:
    """(model version, local bundle folder) behind ``alias``, cached per version under the state home."""
    client = mlflow_client(config)
    name = config.mlflow.model_name
    version = alias_version(client, name, alias)
    if version is None:
        raise NothingPublishedError(
            f"no version of {name} has the alias '{alias}' yet: run the weekly DAG first"
        )
    return version, version_bundle(config, str(version.version))


def version_bundle(config: PipelineConfig, version: str) -> Path:
    """The local bundle folder of one registered version, downloaded once into the cache."""
    import mlflow

    name = config.mlflow.model_name
    cache = StateLayout(config.state_home).model_cache / name / version
    bundle = cache / "artifacts" / "bundle"
    if not (bundle / "bundle.json").is_file():
        with atomic_dir(cache) as staging:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(staging)
            )
    return bundle


def list_versions(config: PipelineConfig) -> list[dict[str, Any]]:
    """Every registered version, newest first, as ``{version, aliases, tags, metrics}``."""
    client = mlflow_client(config)
    name = config.mlflow.model_name
    # Version search results leave aliases out; the registered model holds them all.
    aliases = client.get_registered_model(name).aliases
    rows = [
        {
            "version": int(version.version),
            "aliases": sorted(
                alias for alias, number in aliases.items() if str(number) == str(version.version)
            ),
            "tags": dict(sorted(version.tags.items())),
            "metrics": dict(sorted(client.get_run(version.run_id).data.metrics.items())),
        }
        for version in client.search_model_versions(f"name = '{name}'")
    ]
    return sorted(rows, key=lambda row: -row["version"])


def rollback(config: PipelineConfig, reason: str) -> str:
    """Make the ``previous`` version champion again (the replaced champion becomes ``previous``)."""
    client = mlflow_client(config)
    previous = alias_version(client, config.mlflow.model_name, PREVIOUS)
    if previous is None:
        raise NothingPublishedError(f"no version of {config.mlflow.model_name} has the alias '{PREVIOUS}'")
    promote(config, str(previous.version), reason=f"rollback: {reason}")
    return str(previous.version)


def champion_embeddings(config: PipelineConfig) -> Embeddings | None:
    """The champion's vectors, to compare a candidate with on the candidate's own holdout."""
    try:
        _, bundle = download_bundle(config, CHAMPION)
    except NothingPublishedError:
        return None
    return read_embeddings(bundle / "embeddings")


def champion_status(config: PipelineConfig) -> dict[str, Any]:
    """What ``recsys status`` reports about the version behind ``champion``."""
    client = mlflow_client(config)
    name = config.mlflow.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise NothingPublishedError(f"no version of {name} is the champion yet: run `make run` first")
    run = client.get_run(version.run_id)
    tags = version.tags
    status = {
        "model": name,
        "version": int(version.version),
        "aliases": list(version.aliases),
        "run_id": version.run_id,
        "kind": tags.get("kind", "full"),
        "data_window": {"start": tags.get("data_interval_start"), "end": tags.get("data_interval_end")},
        "created_at": _millis_iso(version.creation_timestamp),
        "metrics": dict(sorted(run.data.metrics.items())),
        "tags": dict(sorted(tags.items())),
    }
    if status["kind"] == "refresh":
        status["refresh"] = {
            "parent_version": int(tags["parent_version"]),
            "derived_from_version": int(tags["derived_from_version"]),
            "day": tags["refresh_day"],
            "users_updated": int(tags["users_updated"]),
            "users_added": int(tags["users_added"]),
            "items_added": int(tags["items_added"]),
            "refresh_s": float(tags["refresh_s"]),
        }
    return status


def version_status(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Tags and run metrics of one registered version."""
    client = mlflow_client(config)
    model_version = client.get_model_version(config.mlflow.model_name, version)
    return {
        "version": int(model_version.version),
        "tags": dict(model_version.tags),
        "metrics": dict(client.get_run(model_version.run_id).data.metrics),
    }


def _millis_iso(millis: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(millis / 1000, tz=UTC).isoformat()
