import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline import tracking
from recsys_pipeline.als import ModelFitError, train, warm_start
from recsys_pipeline.config import AlsConfig, ConfigError, SweepConfig, load_config
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.content import run_content
from recsys_pipeline.stages.publish import run_promotion, run_publish
from recsys_pipeline.stages.train import run_sweep, run_training
from recsys_pipeline.tuning import (
    candidates,
    kept_tuning_age,
    plainest_within_noise,
    sweep,
    validation_split,
    with_tuning_record,
)
from tests.conftest import another_run_of, copy_run, write_interactions

BASE = AlsConfig(factors=8, regularization=1.0, alpha=2.0, iterations=8)


def test_validation_split_is_a_reproducible_per_user_partition(movielens) -> None:
    fit, valid = validation_split(movielens, 0.25, seed=3)
    assert fit.nnz + valid.nnz == movielens.nnz and fit.multiply(valid).nnz == 0
    assert (fit + valid != movielens).nnz == 0
    counts, valid_counts = np.diff(movielens.indptr), np.diff(valid.indptr)
    np.testing.assert_array_equal(valid_counts, np.round(0.25 * counts))
    again, _ = validation_split(movielens, 0.25, seed=3)
    other, _ = validation_split(movielens, 0.25, seed=4)
    assert (again != fit).nnz == 0 and (other != fit).nnz > 0


def test_every_user_keeps_an_item_to_fit_on() -> None:
    matrix = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32))
    fit, valid = validation_split(matrix, 0.9, seed=0)
    np.testing.assert_array_equal(np.diff(fit.indptr), [1, 1, 0])
    np.testing.assert_array_equal(np.diff(valid.indptr), [0, 1, 0])


def test_grid_tries_every_combination_and_random_draws_distinct_ones() -> None:
    space = {"factors": [8, 16], "regularization": [0.1, 1, 10], "alpha": [1, 4]}
    grid = candidates(SweepConfig(space=space))
    assert len(grid) == 12 and len({json.dumps(c, sort_keys=True) for c in grid}) == 12
    drawn = candidates(SweepConfig(strategy="random", trials=5, seed=1, space=space))
    assert len({json.dumps(c, sort_keys=True) for c in drawn}) == 5
    assert drawn == candidates(SweepConfig(strategy="random", trials=5, seed=1, space=space))
    with pytest.raises(ConfigError, match="random sweep needs sweep.trials"):
        load_config(overrides={"als.sweep": {"strategy": "random", "space": space}})


def test_sweep_keeps_the_best_validation_ndcg_and_survives_a_failing_trial(movielens) -> None:
    config = SweepConfig(space={"factors": [4, 5000], "regularization": [0.01, 30.0]}, seed=0)
    result = sweep(movielens, BASE, config, k=10)
    scored = [t for t in result.trials if "metrics" in t]
    failed = [t for t in result.trials if "error" in t]
    assert len(scored) == 2 and len(failed) == 2 and "factors=5000 exceeds" in failed[0]["error"]
    best = max(scored, key=lambda t: t["metrics"]["ndcg_at_10"])
    assert result.best.hyperparameters() == BASE.with_params(best["params"]).hyperparameters()
    assert scored[0]["metrics"]["ndcg_at_10"] != scored[1]["metrics"]["ndcg_at_10"]
    with pytest.raises(ModelFitError, match="every sweep trial failed"):
        sweep(movielens, BASE, SweepConfig(space={"factors": [5000]}), k=10)


def test_sweep_is_one_mlflow_parent_run_with_a_nested_run_per_trial(make_config, movielens) -> None:
    space = {"factors": [4, 8], "alpha": [1.0, 4.0]}
    config = make_config(als__sweep={"space": space}, als__iterations=5)
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__sweep")
    result = run_sweep(movielens, run, config.als.sweep, spark=None)
    client = tracking.client(config)
    parent = client.get_run(result.mlflow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    best_child = max(children, key=lambda r: r.data.metrics["validation_ndcg_at_10"])
    assert (
        parent.data.metrics["best_validation_ndcg_at_10"] == best_child.data.metrics["validation_ndcg_at_10"]
    )
    assert float(parent.data.params["best.alpha"]) == float(best_child.data.params["alpha"])
    assert parent.data.tags["run_key"] == "recsys_weekly/" + run.interval_key


def test_training_stage_trains_the_final_model_with_the_sweeps_choice(make_config, movielens) -> None:
    config = make_config(als__sweep={"space": {"factors": [2, 6]}}, als__iterations=5)
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__sweep")
    write_interactions(run, movielens)
    run_training(run)
    chosen = run.artifacts.trained.sweep_summary()
    assert chosen is not None
    assert run.artifacts.trained.trained_params().factors == chosen["best"]["factors"]
    assert chosen["best"]["popularity_weight"] == config.als.popularity_weight > 0
    assert (
        run.artifacts.served.embeddings().item_factors.shape[1] == chosen["best"]["factors"] + 1
    )  # the prior's


def test_a_sweep_hands_over_its_fit_of_its_choice_for_the_final_fit_to_start_from(movielens) -> None:
    """The fit of the chosen settings on the sweep's fitting part (most of the same pairs) is a start
    two iterations from which fit the whole matrix better than eight from random factors."""
    base = BASE.model_copy(update={"warm_start_iterations": 2})
    result = sweep(movielens, base, SweepConfig(space={"alpha": [1.0, 8.0]}), k=10)
    assert result.fitted is not None
    assert result.fitted.item_factors.shape[1] == result.best.factors  # learned dimensions only
    start = warm_start(result.fitted, result.best, result.best, movielens.shape)
    assert start is not None and start.iterations == 2
    _, warm_losses = train(movielens, result.best, start=start)
    _, cold_losses = train(movielens, result.best)
    assert len(warm_losses) == 2 and warm_losses[-1] < cold_losses[-1]


def test_a_sweep_starts_from_last_weeks_winner_then_its_nearest_neighbours() -> None:
    space = {"regularization": [1.0, 10.0, 100.0], "alpha": [1.0, 4.0], "popularity_weight": [0.0, 0.2]}
    config = SweepConfig(space=space)
    assert all("popularity_weight" not in c for c in candidates(config)) and len(candidates(config)) == 6
    winner = AlsConfig(regularization=100.0, alpha=4.0)
    ordered = candidates(config, winner.hyperparameters())
    assert ordered[0] == {"alpha": 4.0, "regularization": 100.0}
    assert ordered[1] in ({"alpha": 1.0, "regularization": 100.0}, {"alpha": 4.0, "regularization": 10.0})
    assert ordered[-1] == {"alpha": 1.0, "regularization": 1.0} and len(ordered) == 6


def test_every_trained_candidate_is_scored_at_each_popularity_weight_within_the_time_box(movielens) -> None:
    space = {"regularization": [1.0, 10.0, 30.0], "popularity_weight": [0.0, 0.25]}
    unboxed = sweep(movielens, BASE, SweepConfig(space=space, max_seconds=None), k=10)
    assert len(unboxed.trials) == 6 and unboxed.untried == 0
    assert {t["params"]["popularity_weight"] for t in unboxed.trials} == {0.0, 0.25}
    assert (
        unboxed.best.popularity_weight
        == max(unboxed.trials, key=lambda t: t["metrics"]["ndcg_at_10"])["params"]["popularity_weight"]
    )
    # A box shorter than one candidate: only the first (the start) is tried.
    start = BASE.with_params({"regularization": 30.0})
    boxed = sweep(movielens, BASE, SweepConfig(space=space, max_seconds=1e-6), k=10, start=start)
    assert boxed.untried == 2 and [t["params"]["regularization"] for t in boxed.trials] == [30.0, 30.0]


def test_the_sweep_keeps_unweighted_confidences_unless_the_weighting_wins_beyond_noise() -> None:
    rng = np.random.default_rng(0)
    plain_scores = rng.random(2_000)
    plain = AlsConfig(weighting="none")
    weighted = AlsConfig(weighting="bm25")
    noise = rng.normal(scale=0.3, size=2_000)

    def best(shift: float) -> dict[str, tuple[float, AlsConfig, np.ndarray]]:
        weighted_scores = plain_scores + shift + noise
        return {
            "none": (float(plain_scores.mean()), plain, plain_scores),
            "bm25": (float(weighted_scores.mean()), weighted, weighted_scores),
        }

    # The standard error of the paired difference is 0.3 / sqrt(2000), about 0.0067.
    tied = best(0.0045 - noise.mean())
    assert tied["bm25"][0] > tied["none"][0] and plainest_within_noise(tied)[1] is plain
    clear = best(0.03 - noise.mean())
    assert plainest_within_noise(clear)[1] is weighted
    # Without an unweighted candidate (a time box that tried only the weighted one) the best stands.
    assert plainest_within_noise({"bm25": clear["bm25"]})[1] is weighted
    # An unweighted winner needs no rule.
    assert plainest_within_noise(best(-0.03 - noise.mean()))[1] is plain


def test_a_sweeps_choice_is_kept_until_it_is_too_old_or_the_settings_change() -> None:
    als = AlsConfig(sweep=SweepConfig(space={"alpha": [1.0, 4.0]}, retune_after_days=28))
    assert als.sweep is not None
    tuned = datetime(2024, 1, 7, tzinfo=UTC)
    summary = with_tuning_record({"best": als.hyperparameters()}, als, tuned)
    assert kept_tuning_age(summary, als, tuned + timedelta(days=7)) == 7
    assert kept_tuning_age(summary, als, tuned + timedelta(days=28)) is None
    # How fast, how often, or from where the final fit starts asks nothing new of a sweep.
    faster = als.sweep.model_copy(update={"max_seconds": 60.0, "retune_after_days": 35.0})
    same = als.model_copy(update={"sweep": faster, "warm_start_iterations": 3})
    assert kept_tuning_age(summary, same, tuned + timedelta(days=30)) == 30
    changed = [
        als.model_copy(update={"factors": 32}),
        als.model_copy(update={"sweep": als.sweep.model_copy(update={"space": {"alpha": [1.0, 8.0]}})}),
        als.model_copy(update={"sweep": als.sweep.model_copy(update={"retune_after_days": None})}),
    ]
    assert all(kept_tuning_age(summary, other, tuned + timedelta(days=7)) is None for other in changed)
    assert kept_tuning_age({"best": {}}, als, tuned + timedelta(days=7)) is None  # tuned before the record
    assert kept_tuning_age(summary, als, tuned - timedelta(days=7)) is None  # a replay of an earlier week


def test_the_next_weekly_keeps_its_champions_tuning_and_starts_from_its_factors(own_weekly_run) -> None:
    sweep_config = SweepConfig(space={"alpha": [1.0, 4.0]}, validation_users=300, retune_after_days=10)
    base = own_weekly_run.config
    als = base.als.model_copy(update={"sweep": sweep_config, "warm_start_iterations": 3})
    first = another_run_of(own_weekly_run, "manual__swept", base.model_copy(update={"als": als}))
    # Nothing published yet: the final fit starts from the sweep's own fit of its choice.
    assert run_training(first)["warm_start_iterations"] == 3
    assert len(first.artifacts.trained.training_losses()) == 3
    run_content(first)
    run_promotion(first, run_publish(first))
    tuned = first.artifacts.trained.sweep_summary()
    assert tuned is not None and tuned["tuned_through"] == first.interval_end.isoformat()

    following = copy_run(first, "1998-04-23", "1998-04-30")
    metrics = run_training(following)
    assert metrics["tuning_s"] == 0 and metrics["tuning_age_days"] == 7
    assert following.artifacts.trained.sweep_summary() == tuned
    assert following.artifacts.trained.trained_params() == first.artifacts.trained.trained_params()
    assert metrics["warm_start_iterations"] == 3 and len(following.artifacts.trained.training_losses()) == 3

    later = copy_run(first, "1998-04-30", "1998-05-07")  # 14 days after the champion's sweep: tune again
    metrics = run_training(later)
    assert metrics["tuning_s"] > 0 and metrics["tuning_age_days"] == 0
    assert later.artifacts.trained.sweep_summary()["tuned_through"] == later.interval_end.isoformat()
