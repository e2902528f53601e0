"""Hyperparameter sweeps for ALS, chosen on a validation split carved from the training matrix.

The run's holdout stays untouched for the evaluation gate: choosing hyperparameters on
the data that then judges them would flatter the candidate.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.als import ModelFitError, train
from recsys_pipeline.config import AlsConfig, SweepConfig
from recsys_pipeline.evaluate import EvaluationSet

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def validation_split(
    user_items: sp.csr_matrix, share: float, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per-user stratified random split: round(share x n) of each user's items go to validation.

    Every user keeps at least one item for fitting; users with a single item are not validated.
    """
    user_items = user_items.tocsr()
    counts = np.diff(user_items.indptr)
    n_valid = np.clip(np.round(share * counts), 0, np.maximum(counts - 1, 0)).astype(np.int64)
    rows = np.repeat(np.arange(user_items.shape[0]), counts)
    order = np.lexsort((np.random.default_rng(seed).random(user_items.nnz), rows))
    rank_in_row = np.empty(user_items.nnz, dtype=np.int64)
    rank_in_row[order] = np.arange(user_items.nnz) - user_items.indptr[rows[order]]
    valid = rank_in_row < n_valid[rows]
    coo = user_items.tocoo()

    def part(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((coo.data[mask], (coo.row[mask], coo.col[mask])), shape=user_items.shape)

    return part(~valid), part(valid)


def candidates(sweep: SweepConfig) -> list[dict[str, float]]:
    """The hyperparameter combinations a sweep tries, in a reproducible order."""
    space = sorted(sweep.space.items())
    grid: list[dict[str, float]] = [
        {name: value for (name, _), value in zip(space, values, strict=True)}
        for values in itertools.product(*(values for _, values in space))
    ]
    rng = np.random.default_rng(sweep.seed)
    if sweep.strategy == "grid":
        if sweep.trials is None or sweep.trials >= len(grid):
            return grid
        return [grid[i] for i in sorted(rng.choice(len(grid), size=sweep.trials, replace=False))]
    return [grid[i] for i in rng.choice(len(grid), size=min(sweep.trials or 1, len(grid)), replace=False)]


@dataclass
class SweepResult:
    best: AlsConfig
    objective: str
    score: float  # the best trial's validation objective
    trials: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "best": self.best.hyperparameters(),
            "trials": self.trials,
            "mlflow_run_id": self.mlflow_run_id,
        }


TrialCallback = Callable[[int, dict[str, float], dict[str, float] | None, str | None], None]


def sweep(
    user_items: sp.csr_matrix,
    base: AlsConfig,
    config: SweepConfig,
    k: int,
    spark: SparkSession | None = None,
    on_trial: TrialCallback | None = None,
    max_users: int | None = None,
) -> SweepResult:
    """Train every candidate on the fitting part, score it on validation (a seeded sample of at most
    ``max_users`` users, the same for every trial), keep the best ``ndcg_at_k``."""
    fit, valid = validation_split(user_items, config.validation_share, config.seed)
    evaluation = EvaluationSet.build(fit, valid, max_users, config.seed)
    objective = f"ndcg_at_{k}"
    best: tuple[float, AlsConfig] | None = None
    trials: list[dict[str, Any]] = []
    for number, params in enumerate(candidates(config)):
        trial_config = base.with_params(params)
        try:
            embeddings, _ = train(fit, trial_config, spark)
        except ModelFitError as error:
            trials.append({"params": params, "error": str(error)})
            if on_trial is not None:
                on_trial(number, params, None, str(error))
            continue
        metrics = evaluation.evaluate(embeddings, k)
        trials.append({"params": params, "metrics": metrics})
        if on_trial is not None:
            on_trial(number, params, metrics, None)
        log.info("trial %d %s: %s=%.4f", number, params, objective, metrics[objective])
        if best is None or metrics[objective] > best[0]:
            best = (metrics[objective], trial_config)
    if best is None:
        reasons = "; ".join(sorted({trial["error"] for trial in trials}))
        raise ModelFitError(f"every sweep trial failed: {reasons}")
    return SweepResult(best[1], objective, best[0], trials)
