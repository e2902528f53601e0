"""Train the run's ALS model (after a hyperparameter sweep, if configured) and record how."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from recsys_pipeline import tracking
from recsys_pipeline.als import item_weights, train
from recsys_pipeline.config import AlsConfig, SweepConfig
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.tuning import SweepResult, sweep

if TYPE_CHECKING:
    import scipy.sparse as sp
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def run_training(run: RunContext, spark: SparkSession | None = None) -> dict[str, float]:
    """Train on the run's training matrix and write its model folder (the hyperparameters used
    included); Spark only with ``als.backend: spark``."""
    user_items = run.artifacts.interactions.train_matrix()
    params = run.config.als
    sweep_summary, tuning_s = None, 0.0
    if params.sweep is not None:
        result = run_sweep(user_items, run, params.sweep, spark, Registry(run.config).reference_params(run))
        params, sweep_summary, tuning_s = result.best, result.summary(), result.seconds
        log.info("sweep chose %s in %.1f s", params.hyperparameters(), tuning_s)
    embeddings, losses = train(user_items, params, spark)
    run.artifacts.write_trained(embeddings, losses, params, item_weights(user_items, params), sweep_summary)
    log.info("ALS loss per iteration: %s", ", ".join(f"{loss:.5f}" for loss in losses))
    metrics = {
        "training_loss": losses[-1],
        "trained_users": float(len(embeddings.user_idx)),
        "trained_items": float(len(embeddings.item_idx)),
        "tuning_s": tuning_s,
    }
    run.artifacts.write_metrics("train", metrics)
    return metrics


def run_sweep(
    user_items: sp.csr_matrix,
    run: RunContext,
    sweep_config: SweepConfig,
    spark: SparkSession | None,
    start: AlsConfig | None = None,
) -> SweepResult:
    """Sweep for the run (from ``start``, if given), logged as one MLflow parent run with a nested
    run per trial."""
    import mlflow

    config = run.config
    with tracking.fluent(config) as bound:
        experiment = tracking.experiment_id(bound, config)

        def log_trial(
            number: int, params: dict[str, float | str], metrics: dict[str, float] | None, error: str | None
        ) -> None:
            with mlflow.start_run(experiment_id=experiment, run_name=f"trial {number}", nested=True):
                mlflow.log_params(params)
                if metrics is not None:
                    mlflow.log_metrics({f"validation_{name}": value for name, value in metrics.items()})
                else:
                    mlflow.set_tag("error", error or "")

        with mlflow.start_run(
            experiment_id=experiment,
            run_name=f"sweep {run.run_key}",
            tags={"run_key": run.run_key, "kind": "sweep"},
        ) as parent:
            result = sweep(
                user_items,
                config.als,
                sweep_config,
                config.evaluation.k,
                spark,
                log_trial,
                start,
            )
            mlflow.log_params(
                {f"best.{name}": value for name, value in result.best.hyperparameters().items()}
            )
            mlflow.log_metrics(
                {f"best_validation_{result.objective}": result.score, "tuning_s": result.seconds}
            )
            result.mlflow_run_id = parent.info.run_id
            mlflow.log_dict(result.summary(), "sweep.json")
    return result
