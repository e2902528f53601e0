"""MLflow clients bound to the configured tracking server (or the embedded SQLite store).

Clients are built per call with explicit URIs; MLflow's process-wide tracking and registry URIs
are set only inside :func:`fluent`, for code that needs MLflow's fluent API (runs, model logging),
and restored after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from recsys_pipeline.config import RegistryConfig
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.state import StateLayout, describe_holder, file_lock

# Progress bars would land in task logs as noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def display_uri(config: RegistryConfig) -> str:
    """The tracking URI without any credentials it may carry, for messages and logs."""
    return redact_text(config.tracking_uri)


def client(config: RegistryConfig) -> Any:
    """An ``MlflowClient`` for the configured tracking and registry store."""
    from mlflow import MlflowClient

    if config.mlflow.tracking_uri is not None:
        return MlflowClient(config.tracking_uri, config.tracking_uri)
    # MLflow creates and migrates a new SQLite store on first use without a lock of its own (for
    # its tracking and registry stores), so runs starting at once on a new state folder would
    # migrate it together and fail; each process's first use happens under a lock beside the
    # database (a file lock reaches every process SQLite itself can serve).
    layout = StateLayout.of(config)
    with file_lock(
        layout.mlflow_dir / "store.lock",
        "MLflow store",
        shared=False,
        timeout_s=config.locks.timeout_s,
        holder=describe_holder(),
    ):
        bound = MlflowClient(config.tracking_uri, config.tracking_uri)
        bound.search_experiments(max_results=1)
        bound.search_registered_models(max_results=1)
    return bound


@contextmanager
def fluent(config: RegistryConfig) -> Iterator[Any]:
    """MLflow's fluent API pointed at the configured store for the block; yields a client too."""
    import mlflow

    bound = client(config)
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    try:
        yield bound
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def experiment_id(bound: Any, config: RegistryConfig) -> str:
    """The configured experiment, created on first use."""
    from mlflow.exceptions import MlflowException

    experiment = bound.get_experiment_by_name(config.mlflow.experiment)
    if experiment is not None:
        return str(experiment.experiment_id)
    # The embedded store keeps artifacts beside its database; a tracking server decides for itself.
    location = (
        StateLayout.of(config).mlflow_artifacts.as_uri() if config.mlflow.tracking_uri is None else None
    )
    try:
        return str(bound.create_experiment(config.mlflow.experiment, artifact_location=location))
    except MlflowException as error:
        # Another run created it since this one looked.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(bound.get_experiment_by_name(config.mlflow.experiment).experiment_id)
