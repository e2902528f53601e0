"""Hyperparameter sweeps for ALS, chosen on a validation split carved from the training matrix.

The run's holdout stays untouched for the evaluation gate: choosing hyperparameters on
the data that then judges them would flatter the candidate.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.als import ModelFitError, item_popularity, train, with_popularity_prior
from recsys_pipeline.config import AlsConfig, SweepConfig, TunableParameter
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.evaluate import EvaluationSet

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
PRIOR: TunableParameter = "popularity_weight"


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


def candidates(
    sweep: SweepConfig, start: dict[str, float | str] | None = None
) -> list[dict[str, float | str]]:
    """The training hyperparameters a sweep tries, in a reproducible order (``popularity_weight`` is
    not among them: :func:`sweep` scores every trained candidate at each weight).

    With ``start`` (last week's winner, say), the grid point nearest it comes first and the rest
    follow by steps on the grid from it, so a time-boxed sweep explores around what worked last time.
    """
    space = sorted((name, values) for name, values in sweep.space.items() if name != PRIOR)
    grid: list[dict[str, float | str]] = [
        {name: value for (name, _), value in zip(space, values, strict=True)}
        for values in itertools.product(*(values for _, values in space))
    ]
    rng = np.random.default_rng(sweep.seed)
    if sweep.strategy == "grid":
        if sweep.trials is not None and sweep.trials < len(grid):
            grid = [grid[i] for i in sorted(rng.choice(len(grid), size=sweep.trials, replace=False))]
    else:
        grid = [grid[i] for i in rng.choice(len(grid), size=min(sweep.trials or 1, len(grid)), replace=False)]
    if start is None or not space:
        return grid
    nearest = {name: _nearest(values, start[name]) for name, values in space}

    def steps(candidate: dict[str, float | str]) -> int:
        return sum(abs(values.index(candidate[name]) - nearest[name]) for name, values in space)

    return sorted(grid, key=steps)  # stable: ties keep the grid's order


def _nearest(values: list[float | str], value: float | str) -> int:
    if isinstance(value, str) or any(isinstance(v, str) for v in values):
        return values.index(value) if value in values else 0
    return min(range(len(values)), key=lambda i: abs(float(values[i]) - value))


@dataclass
class SweepResult:
    best: AlsConfig
    objective: str
    score: float  # the best trial's validation objective
    trials: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    untried: int = 0  # candidates the time box left out
    # The chosen candidate's vectors (without the prior), fitted on the split's fitting part: where
    # the final fit on the whole matrix starts (``als.warm_start``). Not part of the summary.
    fitted: Embeddings | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "best": self.best.hyperparameters(),
            "trials": self.trials,
            "mlflow_run_id": self.mlflow_run_id,
            "seconds": self.seconds,
            "untried": self.untried,
        }


TrialCallback = Callable[[int, dict[str, float | str], dict[str, float] | None, str | None], None]


def sweep(
    user_items: sp.csr_matrix,
    base: AlsConfig,
    config: SweepConfig,
    k: int,
    spark: SparkSession | None = None,
    on_trial: TrialCallback | None = None,
    start: AlsConfig | None = None,
) -> SweepResult:
    """Train each candidate on the fitting part and score it on validation (a seeded sample of at most
    ``validation_users`` users, the same for every trial) at each popularity weight; keep the best
    ``ndcg_at_k``. The weight only adds a dimension (:func:`~recsys_pipeline.als.with_popularity_prior`),
    so trying one costs a scoring pass, not a training. ``start`` (else ``base``, the configured
    values) is tried first (see :func:`candidates`); with ``max_seconds``, no candidate starts that
    would end past it by the last one's duration."""
    started = time.perf_counter()
    fit, valid = validation_split(user_items, config.validation_share, config.seed)
    evaluation = EvaluationSet.build(fit, valid, config.validation_users, config.seed)
    popularity = item_popularity(fit)
    weights = [float(weight) for weight in config.space.get(PRIOR, [base.popularity_weight])]
    objective = f"ndcg_at_{k}"
    # The best trial per weighting: (validation score, its config, its per-user scores), and its vectors.
    best: dict[str, tuple[float, AlsConfig, np.ndarray]] = {}
    fitted: dict[str, Embeddings] = {}
    trials: list[dict[str, Any]] = []
    training = candidates(config, (start or base).hyperparameters())
    number, last_s, untried = 0, 0.0, 0
    for position, params in enumerate(training):
        elapsed = time.perf_counter() - started
        if position and config.max_seconds is not None and elapsed + last_s > config.max_seconds:
            untried = len(training) - position
            log.info("sweep time box (%.0f s) reached after %d candidates", config.max_seconds, position)
            break
        trial_started = time.perf_counter()
        trained_config = base.with_params(params | {PRIOR: 0.0})
        try:
            embeddings, _ = train(fit, trained_config, spark, track_loss=False)
        except ModelFitError as error:
            for weight in weights:
                trials.append({"params": params | {PRIOR: weight}, "error": str(error)})
                if on_trial is not None:
                    on_trial(number, params | {PRIOR: weight}, None, str(error))
                number += 1
            last_s = time.perf_counter() - trial_started
            continue
        for weight in weights:
            trial_params = params | {PRIOR: weight}
            scored = evaluation.scores(with_prior(embeddings, popularity, weight), k)
            metrics = scored.summary()
            trials.append({"params": trial_params, "metrics": metrics})
            if on_trial is not None:
                on_trial(number, trial_params, metrics, None)
            log.info("trial %d %s: %s=%.4f", number, trial_params, objective, metrics[objective])
            trial_config = base.with_params(trial_params)
            held = best.get(trial_config.weighting)
            if held is None or metrics[objective] > held[0]:
                best[trial_config.weighting] = (metrics[objective], trial_config, scored.per_user[objective])
                fitted[trial_config.weighting] = embeddings
            number += 1
        last_s = time.perf_counter() - trial_started
    if not best:
        reasons = "; ".join(sorted({trial["error"] for trial in trials}))
        raise ModelFitError(f"every sweep trial failed: {reasons}")
    score, chosen, _ = plainest_within_noise(best)
    return SweepResult(
        chosen,
        objective,
        score,
        trials,
        seconds=time.perf_counter() - started,
        untried=untried,
        fitted=fitted[chosen.weighting],
    )


def tuned_for(als: AlsConfig) -> str:
    """What a sweep's choice answers to, as a digest: the als settings, less those that only say how
    fast to tune, how often, or where the final fit starts."""
    settings = als.model_dump(mode="json", exclude={"warm_start_iterations"})
    if settings["sweep"] is not None:
        settings["sweep"] = {
            name: value
            for name, value in settings["sweep"].items()
            if name not in ("max_seconds", "retune_after_days")
        }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def with_tuning_record(summary: dict[str, Any], als: AlsConfig, data_end: datetime) -> dict[str, Any]:
    """A sweep's summary with what :func:`kept_tuning_age` checks: the end of the data it tuned on and
    the settings it tuned under."""
    return summary | {"tuned_through": data_end.isoformat(), "tuned_for": tuned_for(als)}


def kept_tuning_age(summary: dict[str, Any] | None, als: AlsConfig, data_end: datetime) -> float | None:
    """The age in days (from the end of its data to ``data_end``) of the sweep behind ``summary`` when
    its choice may be kept instead of sweeping again: the same settings and younger than
    ``als.sweep.retune_after_days``. None: sweep. Why keep it: the choice moves little week to week on
    the same kind of data, the sweep is most of a steady weekly's training, and the evaluation gate
    still judges every model trained with it."""
    if als.sweep is None or als.sweep.retune_after_days is None or summary is None:
        return None
    if "tuned_through" not in summary or summary.get("tuned_for") != tuned_for(als):
        return None
    age = (data_end - datetime.fromisoformat(summary["tuned_through"])).total_seconds() / 86_400
    return age if 0 <= age < als.sweep.retune_after_days else None


def plainest_within_noise(
    best: dict[str, tuple[float, AlsConfig, np.ndarray]],
) -> tuple[float, AlsConfig, np.ndarray]:
    """The best weighted candidate, unless the best unweighted one (``weighting: none``) is within one
    standard error of the paired per-user difference between them: then the unweighted one (the
    one-standard-error rule, Hastie, Tibshirani & Friedman, ESL 7.10, with the untransformed
    confidences as the plainer model). Why: on MovieLens-100k the two weightings' best validation
    scores differ by less than their noise (which wins flips with the split's seed) while the test
    split favours the unweighted one by 0.02; on the synthetic logs BM25 wins by many errors."""
    winner = max(best.values(), key=lambda entry: entry[0])
    plain = best.get("none")
    if plain is None or winner is plain:
        return winner
    difference = winner[2] - plain[2]
    error = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else np.inf
    if difference.mean() <= error:
        log.info(
            "sweep keeps weighting none: %.4f is within one standard error (%.4f) of the best %.4f",
            plain[0],
            error,
            winner[0],
        )
        return plain
    return winner


def with_prior(embeddings: Embeddings, popularity: np.ndarray, weight: float) -> Embeddings:
    """Embeddings trained without the popularity prior, with it at ``weight``."""
    user_factors, item_factors = with_popularity_prior(
        embeddings.user_factors, embeddings.item_factors, popularity[embeddings.item_idx], weight
    )
    return Embeddings(
        embeddings.user_idx, user_factors, embeddings.item_idx, item_factors, prior_dims=1 if weight else 0
    )
