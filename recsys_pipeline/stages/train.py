"""Train the run's ALS model (after a hyperparameter sweep, if configured) and record how."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from recsys_pipeline import tracking
from recsys_pipeline.als import item_weights, train, warm_start
from recsys_pipeline.config import AlsConfig, SweepConfig
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.tuning import SweepResult, kept_tuning_age, sweep, with_tuning_record

if TYPE_CHECKING:
    import scipy.sparse as sp
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def run_training(run: RunContext, spark: SparkSession | None = None) -> dict[str, float]:
    """Train on the run's training matrix and write its model folder (the hyperparameters used
    included); Spark only with ``als.backend: spark``.

    With a reference version (the champion of the run's time): a sweep starts from its settings, or is
    skipped while the reference's own is recent enough (:func:`~recsys_pipeline.tuning.kept_tuning_age`).
    The final fit starts (:func:`~recsys_pipeline.als.warm_start`) from the sweep's own fit of its
    choice when it swept, else from the reference's factors when they solved the same problem."""
    user_items = run.artifacts.interactions.train_matrix()
    config = run.config.als
    reference = Registry(run.config).reference_bundle(run)
    reference_params = None if reference is None else reference[1].trained_params(config)
    reference_sweep = None if reference is None else reference[1].sweep_summary()
    kept_age = kept_tuning_age(reference_sweep, config, run.interval_end)
    params, sweep_summary, tuning_s, swept = config, None, 0.0, None
    if reference is not None and reference_params is not None and kept_age is not None:
        params, sweep_summary = reference_params, reference_sweep
        log.info("kept version %s's tuning, on data %.1f days old: no sweep", reference[0], kept_age)
    elif config.sweep is not None:
        result = run_sweep(user_items, run, config.sweep, spark, reference_params)
        params, tuning_s, swept = result.best, result.seconds, result.fitted
        sweep_summary = with_tuning_record(result.summary(), config, run.interval_end)
    start = None
    if swept is not None:
        # The sweep fitted the chosen settings on all but its validation share of these same pairs:
        # nearer the final solution than any earlier version's factors.
        start = warm_start(swept, params, params, user_items.shape)
        if start is not None:
            log.info("final fit from the sweep's fit of its choice, %d iterations", start.iterations)
    elif reference is not None and reference_params is not None:
        start = warm_start(reference[1].embeddings().warm_items(), reference_params, params, user_items.shape)
        if start is not None:
            log.info("final fit from version %s's factors, %d iterations", reference[0], start.iterations)
    log.info("training with %s", params.hyperparameters())
    embeddings, losses = train(user_items, params, spark, start)
    run.artifacts.write_trained(embeddings, losses, params, item_weights(user_items, params), sweep_summary)
    log.info("ALS loss per iteration: %s", ", ".join(f"{loss:.5f}" for loss in losses))
    metrics = {
        "training_loss": losses[-1],
        "trained_users": float(len(embeddings.user_idx)),
        "trained_items": float(len(embeddings.item_idx)),
        "tuning_s": tuning_s,
        "tuning_age_days": kept_age or 0.0,
        "warm_start_iterations": float(0 if start is None else start.iterations),
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
