"""Publish a run's bundle as a registered model version, log rejected runs, and promote through gates."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys_pipeline import tracking
from recsys_pipeline.bundle import (
    BUNDLE_FORMAT,
    MODEL_MANIFEST,
    Bundle,
    BundleIntegrityError,
    manifest_bytes,
    manifest_sha256,
    tree_manifest,
    write_bundle,
)
from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.errors import StageSkipped
from recsys_pipeline.registry import CHAMPION, GateFailedError, Registry, VersionMark, VersionTags, data_end
from recsys_pipeline.runs import REQUIRED_GATES, RunContext
from recsys_pipeline.serving import model_signature
from recsys_pipeline.state import StateLayout

log = logging.getLogger(__name__)
# Logged as the model's code (models-from-code): the pyfunc is never pickled.
PACKAGE = Path(__file__).resolve().parent.parent
PYFUNC_CODE = PACKAGE / "pyfunc_entry.py"
MODEL_PATH = "model"  # the model's folder among its run's artifacts


def code_version() -> str:
    """sha256 of the package's source files as they run: uncommitted changes make another version
    (a git commit would not), and no git is needed where the package is installed."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_tags(run: RunContext) -> VersionTags:
    """The tags a run's MLflow run and model version carry: identity, window, input, code, lineage."""
    record = run.artifacts.refresh_record() if run.mode == "refresh" else None
    return VersionTags(
        dag_id=run.dag_id,
        airflow_run_id=run.run_id,
        run_key=run.run_key,
        data_interval_start=run.interval_start,
        data_interval_end=run.interval_end,
        source=run.config.source.name,
        input_fingerprint=run.artifacts.interactions.input_fingerprint(),
        config_hash=run.config.fingerprint(),
        code_version=code_version(),
        backend=run.artifacts.trained.trained_params().backend,
        bundle_format=str(BUNDLE_FORMAT),
        kind=run.mode,
        lineage=record.lineage() if record is not None else None,
    )


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config values as ``a.b.c`` params (lists as JSON)."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, child in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), child))
        return flat
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def trained_params(run: RunContext) -> dict[str, str]:
    """The hyperparameters the model was trained with (``als.*`` holds the config, before any sweep)."""
    trained = run.artifacts.trained.trained_params()
    params = flatten("trained", {"backend": trained.backend, **trained.hyperparameters()})
    sweep = run.artifacts.trained.sweep_summary()
    if sweep is not None:
        params["trained.sweep_run_id"] = str(sweep["mlflow_run_id"])
    return params


def run_publish(run: RunContext) -> str:
    """Log the run and register its bundle as a new model version (or return the one already there).

    See :func:`register_bundle` for how the model is checked on its way to the store.
    """
    config = run.config
    tags = run_tags(run)
    existing = Registry(config).find_version(tags)
    if existing is not None:
        log.info("run %s already published as version %s", tags.run_key, existing.version)
        killed_after_registering = VersionTags.of(existing).airflow_run_id == run.run_id
        if run.publication.published_version() is None and killed_after_registering:
            run.publication.mark_published(config.mlflow.model_name, str(existing.version))
        return str(existing.version)
    bundle = write_bundle(
        run, {"tags": tags.as_tags(), "config": config.as_record(), "source": str(config.source.path)}
    )

    def record() -> None:
        import mlflow

        mlflow.log_params(flatten("", config.as_record()))
        mlflow.log_params(trained_params(run))
        mlflow.log_metrics(run.artifacts.read_metrics())
        for step, loss in enumerate(run.artifacts.trained.training_losses()):
            mlflow.log_metric("training_loss_per_iteration", loss, step=step)
        mlflow.log_artifacts(str(run.artifacts.validation_dir), artifact_path="validation")
        mlflow.log_dict(run.artifacts.read_gates(), "gates.json")

    version = register_bundle(config, bundle, tags.as_tags(), tags.run_key, record)
    run.publication.mark_published(config.mlflow.model_name, version)
    log.info("registered %s version %s", config.mlflow.model_name, version)
    return version


def register_bundle(
    config: PipelineConfig, bundle: Path, tags: dict[str, str], run_name: str, record: Callable[[], None]
) -> str:
    """Log ``bundle`` as a pyfunc model in a new MLflow run (``record`` logs what else the run
    holds) and register it with ``tags``; return the version.

    The model is written here first and hashed file by file; that manifest is logged beside it and
    its sha256 registered with the version, so every later load can be checked against it. The
    uploaded copy is downloaded back and checked against it before anything is registered: what the
    store returns is never taken for what was published. That checked copy becomes the registry's
    local copy of the version (:meth:`Registry.keep_verified`), which the next run to load it then
    only verifies instead of downloading again.
    """
    import mlflow

    # The copy downloaded back lands beside the registry's local copies, among which it is moved.
    cache = StateLayout.of(config).model_cache
    cache.mkdir(parents=True, exist_ok=True)
    with tracking.fluent(config) as bound, tempfile.TemporaryDirectory(dir=cache) as downloads:
        with mlflow.start_run(
            experiment_id=tracking.experiment_id(bound, config), run_name=run_name, tags=tags
        ) as active:
            record()
            model_uri = f"runs:/{active.info.run_id}/{MODEL_PATH}"
            with tempfile.TemporaryDirectory() as staging:
                model = Path(staging) / MODEL_PATH
                mlflow.pyfunc.save_model(
                    path=str(model),
                    python_model=str(PYFUNC_CODE),
                    artifacts={"bundle": str(bundle)},
                    # The package travels with the model: it loads where recsys-pipeline is not installed.
                    code_paths=[str(package_source(Path(staging) / "code"))],
                    signature=model_signature(),
                    input_example=input_example(Bundle(bundle)),
                    pip_requirements=serving_requirements(),
                )
                manifest = tree_manifest(model)
                mlflow.log_artifacts(str(model), artifact_path=MODEL_PATH)
                (Path(staging) / MODEL_MANIFEST).write_bytes(manifest_bytes(manifest))
                mlflow.log_artifact(str(Path(staging) / MODEL_MANIFEST))
            uploaded = check_uploaded(model_uri, manifest, Path(downloads))
        version = str(
            mlflow.register_model(
                model_uri,
                config.mlflow.model_name,
                tags={**tags, VersionMark.MANIFEST: manifest_sha256(manifest)},
            ).version
        )
        Registry(config).keep_verified(version, uploaded, manifest_bytes(manifest))
    return version


def log_rejected_run(run: RunContext, reason: str) -> str:
    """Log a run that failed validation (metrics incl. drift, gates, Data Docs); register nothing."""
    import mlflow

    config = run.config
    tags = run_tags(run)
    with tracking.fluent(config) as bound:
        with mlflow.start_run(
            experiment_id=tracking.experiment_id(bound, config),
            run_name=f"{tags.run_key} (rejected)",
            tags={**tags.as_tags(), "rejected": reason[:5000]},
        ) as active:
            mlflow.log_params(flatten("", config.as_record()))
            mlflow.log_metrics(run.artifacts.read_metrics())
            mlflow.log_artifacts(str(run.artifacts.validation_dir), artifact_path="validation")
            mlflow.log_dict(run.artifacts.read_gates(), "gates.json")
    return str(active.info.run_id)


def check_uploaded(model_uri: str, manifest: dict[str, str], staging: Path) -> Path:
    """Download the uploaded model back into ``staging`` and refuse it unless every file is the one
    written here; return where it is."""
    import mlflow

    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging)))
    stored = tree_manifest(downloaded)
    differing = sorted(
        name for name in manifest.keys() | stored.keys() if manifest.get(name) != stored.get(name)
    )
    if differing:
        raise BundleIntegrityError(
            f"the model store returned files other than those uploaded ({', '.join(differing[:3])}): "
            "nothing was registered; check the artifact store and re-run publish"
        )
    return downloaded


def package_source(staging: Path) -> Path:
    """A copy of the ``recsys_pipeline`` sources (no bytecode caches) to log as the model's code."""
    target = staging / PACKAGE.name
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def input_example(bundle: Bundle) -> Any:
    import pandas as pd

    user_idx = bundle.embeddings().user_idx
    return pd.DataFrame({"user_id": [bundle.ids("users")[user_idx[0]]], "k": [10]})


def serving_requirements() -> list[str]:
    """The registered model's environment: the package's own dependencies (the client's, no extra),
    pinned to the versions running here."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    own = [Requirement(spec) for spec in requires("recsys-pipeline") or []]
    return sorted(
        f"{requirement.name}=={version(requirement.name)}" for requirement in own if not requirement.marker
    )


def run_promotion(run: RunContext, version: str) -> str:
    """Promote the run's version only if it is this run's own and every gate recorded for the run passed."""
    registry = Registry(run.config)
    registered = VersionTags.of(registry.version(version)).identity()
    expected = run_tags(run).identity()
    foreign = [name for name in expected if registered[name] != expected[name]]
    if foreign:
        raise GateFailedError(
            f"version {version} was not published by this run (its {', '.join(foreign)} differ): "
            "its gates are not this run's, so it is not promoted"
        )
    gates = run.artifacts.read_gates()
    failed = [
        f"{gate}: {'; '.join(gates[gate]['reasons']) or 'not run'}"
        for gate in REQUIRED_GATES[run.mode]
        if not gates.get(gate, {}).get("passed", False)
    ]
    registry.mark(version, VersionMark.GATES_PASSED, str(not failed).lower())
    if failed:
        registry.mark(version, VersionMark.GATES_FAILED, " | ".join(failed)[:5000])
        raise GateFailedError(f"version {version} not promoted; failed gates: {' | '.join(failed)}")
    if not run.config.mlflow.promote:
        registry.mark(version, VersionMark.WOULD_PROMOTE, "true")
        raise StageSkipped(
            f"dry run: version {version} passed every gate; recorded as would_promote, champion left "
            "as it was"
        )
    champion = registry.alias_version(CHAMPION)
    if champion is not None and data_end(champion) > run.interval_end:
        # A replay of history: the champion has newer data. Moving it back in time is a person's call.
        registry.mark(version, VersionMark.WOULD_PROMOTE, "true")
        raise StageSkipped(
            f"version {version} passed every gate for its window, which ends before the champion's data "
            f"(version {champion.version}): recorded as would_promote, champion left as it was; "
            f"`recsys promote --version {version}` makes it champion"
        )
    registry.promote(
        version,
        reason=f"gates passed in {run.dag_id} {run.interval_key}",
        judged_against=judged_against(run),
    )
    return version


def judged_against(run: RunContext) -> str | None:
    """The version a run was compared with (a weekly) or folded into (a nightly); None for none."""
    record = run.artifacts.refresh_record()
    if record is not None:
        return record.derived_from_version
    reference = run.artifacts.read_metrics().get("reference_version")
    return None if reference is None else str(int(reference))
