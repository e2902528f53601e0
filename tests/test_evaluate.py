import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline.config import GateConfig
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.evaluate import (
    EvaluationSet,
    Scores,
    bootstrap_interval,
    gate,
    paired_lift,
    per_user_metrics,
    ranking_metrics,
    row_difference,
)
from recsys_pipeline.ranking import NO_ITEM, exclude, pad, top_k


def test_metrics_match_hand_computed_values() -> None:
    recommended = np.array([[1, 2, 3], [4, 5, 6]])
    relevant = [np.array([2, 9]), np.array([4, 5, 6, 7])]
    m = ranking_metrics(recommended, relevant, k=3, catalogue_size=10)
    # user 0: one hit at rank 2; user 1: hits at ranks 1, 2, 3
    assert m["precision_at_3"] == pytest.approx((1 / 3 + 3 / 3) / 2)
    assert m["recall_at_3"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    dcg0, idcg0 = 1 / np.log2(3), 1 + 1 / np.log2(3)
    assert m["ndcg_at_3"] == pytest.approx((dcg0 / idcg0 + 1.0) / 2)
    assert m["map_at_3"] == pytest.approx(((1 / 2) / 2 + 1.0) / 2)
    assert m["coverage_at_3"] == pytest.approx(6 / 10)


def test_users_without_relevant_items_are_not_averaged_in() -> None:
    m = ranking_metrics(
        np.array([[1, 2], [3, 4]]), [np.array([1]), np.array([], dtype=int)], k=2, catalogue_size=4
    )
    assert m["precision_at_2"] == pytest.approx(0.5)
    assert m["ndcg_at_2"] == pytest.approx(1.0)


def test_k_larger_than_the_candidate_list_pads_and_penalises_precision() -> None:
    scores = np.array([[0.9, 0.1, 0.5]], dtype=np.float32)
    exclude(scores, sp.csr_matrix(np.array([[0, 1, 0]])))
    best = pad(top_k(scores, k=5)[0], 5)
    assert best.tolist() == [[0, 2, NO_ITEM, NO_ITEM, NO_ITEM]]
    m = ranking_metrics(best, [np.array([0, 2])], k=5, catalogue_size=3)
    assert m["precision_at_5"] == pytest.approx(2 / 5)
    assert m["recall_at_5"] == pytest.approx(1.0)
    assert m["ndcg_at_5"] == pytest.approx(1.0)


def test_evaluation_set_excludes_training_items_and_falls_back_to_popularity() -> None:
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=np.float32))
    holdout = sp.csr_matrix(np.array([[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    evaluation = EvaluationSet.build(train, holdout)
    assert evaluation.users.tolist() == [0, 2]
    assert [r.tolist() for r in evaluation.relevant] == [[3], [1]]
    # user 0 has a vector pointing at item 3; user 2 has none and gets popular unseen items (item 1 first)
    embeddings = Embeddings(
        np.array([0]),
        np.array([[1.0, 0.0]], np.float32),
        np.arange(4),
        np.array([[0, 1], [0, 1], [0.5, 0], [1, 0]], np.float32),
    )
    metrics = evaluation.evaluate(embeddings, k=1)
    assert metrics["precision_at_1"] == pytest.approx(1.0)


def _ndcg_scores(values: np.ndarray) -> Scores:
    return Scores({"ndcg_at_10": np.asarray(values, dtype=np.float64)}, coverage=0.0, k=10)


def test_gate_requires_a_lift_over_baseline_and_no_real_drop_from_the_champion() -> None:
    rng = np.random.default_rng(0)
    config = GateConfig(min_lift_over_baseline=0.0, max_drop_vs_champion=0.02)
    baseline = rng.uniform(0, 0.5, 500)
    better = _ndcg_scores(baseline + rng.normal(0.05, 0.1, 500))

    passed, reasons, figures = gate(better, _ndcg_scores(baseline), None, config, 0.95)
    assert passed and reasons == []
    assert figures["lift_over_baseline_ndcg_at_10"] == pytest.approx(0.05, abs=0.01)
    assert figures["lift_over_baseline_ndcg_at_10_p"] < 0.05
    assert figures["lift_over_baseline_ndcg_at_10_ci_low"] > 0

    # A tie with the baseline is not a lift, however the users are resampled.
    passed, reasons, figures = gate(_ndcg_scores(baseline), _ndcg_scores(baseline), None, config, 0.95)
    assert not passed and "lift over the baseline is +0.0000 on 500 users" in reasons[0]
    assert figures["lift_over_baseline_ndcg_at_10_p"] == 1.0

    # Equal to the champion passes (within the allowed drop); clearly below it fails.
    assert gate(better, _ndcg_scores(baseline), better, config, 0.95)[0]
    champion = _ndcg_scores(better.per_user["ndcg_at_10"] + 0.05)
    passed, reasons, figures = gate(better, _ndcg_scores(baseline), champion, config, 0.95)
    assert not passed and "lift over the champion is -0.0500" in reasons[0]
    assert figures["lift_over_champion_ndcg_at_10_p"] > 0.05


def test_the_champion_is_compared_only_on_holdout_pairs_it_never_trained_on() -> None:
    """Each user goes on to pick a pair the champion trained on earlier events of (m) and a new one
    (f). The champion ranks m first, then f; the candidate, which never saw m, ranks f first. On
    the whole holdout the champion looks far better; on what neither trained on, the candidate is."""
    users = np.arange(40)
    memorised, fresh, other = users % 10, 10 + users % 10, 20 + users % 10
    seen = sp.csr_matrix((np.ones(40), (users, 30 + users % 5)), shape=(40, 35))
    holdout = sp.csr_matrix((np.ones(80), (np.r_[users, users], np.r_[memorised, fresh])), shape=(40, 35))
    evaluation = EvaluationSet.build(seen, holdout)

    def model(first: np.ndarray, second: np.ndarray) -> Embeddings:
        vectors = np.zeros((40, 35), np.float32)
        vectors[users, first], vectors[users, second] = 1.0, 0.5
        return Embeddings(users, vectors, np.arange(35), np.eye(35, dtype=np.float32))

    champion, candidate = model(memorised, fresh), model(fresh, other)
    config = GateConfig(max_drop_vs_champion=0.02)
    baseline = evaluation.popularity_scores(2)
    naive = gate(evaluation.scores(candidate, 2), baseline, evaluation.scores(champion, 2), config, 0.95)
    assert not naive[0] and naive[2]["lift_over_champion_ndcg_at_2"] < -0.3

    unseen = evaluation.without(users, memorised)
    assert all(list(items) == [f] for items, f in zip(unseen.relevant, fresh, strict=True))
    passed, reasons, figures = gate(
        evaluation.scores(candidate, 2),
        baseline,
        unseen.scores(champion, 2),
        config,
        0.95,
        unseen.scores(candidate, 2),
    )
    assert figures["lift_over_champion_ndcg_at_2"] == pytest.approx(1 - 1 / np.log2(3))
    assert not any("champion" in reason for reason in reasons)


def test_paired_gate_sees_a_small_lift_that_unpaired_intervals_overlap_on() -> None:
    """Users differ far more from each other than the two models do on each user: pairing removes the
    spread between users, so a small real lift shows even though the two means' intervals overlap."""
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0, 1, 300)
    candidate = baseline + rng.normal(0.02, 0.02, 300)
    low, _ = bootstrap_interval(candidate)
    _, high = bootstrap_interval(baseline)
    assert low < high
    assert paired_lift(candidate, baseline, 0.0, 0.95).p < 0.05


def test_paired_lower_bound_stays_below_a_planted_lift_at_the_stated_rate() -> None:
    rng = np.random.default_rng(2)
    planted, trials, misses = 0.03, 200, 0
    for trial in range(trials):
        baseline = rng.beta(1.0, 3.0, 150)
        candidate = baseline + rng.normal(planted, 0.15, 150)
        lift = paired_lift(candidate, baseline, 0.0, 0.9, resamples=400, seed=trial)
        misses += lift.ci_low > planted
    # A one-sided 90% bound lies above the planted lift about 10% of the time.
    assert 0.04 <= misses / trials <= 0.17


def test_evaluation_scores_a_seeded_sample_the_same_for_every_model() -> None:
    rng = np.random.default_rng(0)
    train = sp.random(400, 60, density=0.1, random_state=1, format="csr", dtype=np.float32)
    holdout = sp.random(400, 60, density=0.05, random_state=2, format="csr", dtype=np.float32)
    sampled = EvaluationSet.build(train, holdout, max_users=50, seed=3)
    again = EvaluationSet.build(train, holdout, max_users=50, seed=3)
    assert len(sampled.users) == 50 and (sampled.users == again.users).all()
    assert set(sampled.users) <= set(np.flatnonzero(holdout.getnnz(axis=1)))
    full = EvaluationSet.build(train, holdout)
    assert len(full.users) == (holdout.getnnz(axis=1) > 0).sum() > 50
    embeddings = Embeddings(
        np.arange(400),
        rng.normal(size=(400, 4)).astype(np.float32),
        np.arange(60),
        rng.normal(size=(60, 4)).astype(np.float32),
    )
    # Scoring the sample twice gives the same figures: candidate, baseline and champion see the same users.
    assert sampled.evaluate(embeddings, 5) == again.evaluate(embeddings, 5)
    # From the sampled users' rows of the training matrix alone, with every item's popularity: the same.
    their_rows = (sp.diags(np.isin(np.arange(400), sampled.users).astype(np.float32)) @ train).tocsr()
    alone = EvaluationSet.of_users(sampled.users, their_rows, holdout, np.asarray(train.getnnz(axis=0)))
    assert alone.evaluate(embeddings, 5) == sampled.evaluate(embeddings, 5)
    assert alone.evaluate_popularity(5) == sampled.evaluate_popularity(5)
    # Taking out every holdout pair (other users' among them) leaves the sample nothing to pick.
    assert all(len(items) == 0 for items in sampled.without(*holdout.nonzero()).relevant)


def test_no_users_x_items_array_with_a_two_million_item_catalogue() -> None:
    """50k users and 2M items: a dense (users x items) score matrix would be 400 GB."""
    import tracemalloc

    from recsys_pipeline.index import ExactIndex
    from recsys_pipeline.recommendations import recommend_for_users

    n_users, n_items, dims = 50_000, 2_000_000, 8
    rng = np.random.default_rng(0)
    train = sp.csr_matrix(
        (
            np.ones(n_users * 4, np.float32),
            (np.repeat(np.arange(n_users), 4), rng.integers(0, n_items, n_users * 4)),
        ),
        shape=(n_users, n_items),
    )
    holdout = sp.csr_matrix(
        (np.ones(n_users, np.float32), (np.arange(n_users), rng.integers(0, n_items, n_users))),
        shape=(n_users, n_items),
    )
    embeddings = Embeddings(
        np.arange(n_users),
        rng.normal(size=(n_users, dims)).astype(np.float32),
        np.arange(n_items),
        rng.normal(size=(n_items, dims)).astype(np.float32),
    )
    index = ExactIndex(embeddings.item_idx, embeddings.item_factors)
    popularity = np.asarray(train.getnnz(axis=0))
    tracemalloc.start()
    evaluation = EvaluationSet.build(train, holdout, max_users=200, seed=0)
    metrics = evaluation.evaluate(embeddings, 10) | evaluation.evaluate_popularity(10)
    users, _, items, _ = recommend_for_users(
        np.arange(200), embeddings.user_factors, np.ones(n_users, bool), index, train, popularity, 20
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(evaluation.users) == 200 and 0 <= metrics["ndcg_at_10"] <= 1
    assert len(np.unique(users)) == 200 and len(items) == 200 * 20
    assert peak < 600 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_bootstrap_interval_covers_a_planted_mean_at_its_stated_rate() -> None:
    """Skewed per-user scores (as nDCG is) around a known mean: the 95% interval holds it ~95% of runs."""
    from recsys_pipeline.evaluate import bootstrap_interval

    rng = np.random.default_rng(0)
    planted = 0.25
    covered = 0
    trials = 200
    for trial in range(trials):
        scores = rng.beta(1.0, 3.0, size=300)  # mean 0.25
        low, high = bootstrap_interval(scores, 0.95, resamples=400, seed=trial)
        covered += low <= planted <= high
    assert 0.90 <= covered / trials <= 0.99
    narrow = bootstrap_interval(rng.beta(1.0, 3.0, size=3000), 0.95, resamples=400)
    wide = bootstrap_interval(rng.beta(1.0, 3.0, size=30), 0.95, resamples=400)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3


def test_metrics_carry_their_interval_when_asked() -> None:
    recommended = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    relevant = [np.array([2, 9]), np.array([4, 5, 6, 7]), np.array([0])]
    m = ranking_metrics(recommended, relevant, k=3, catalogue_size=10, confidence=0.9)
    for name in ("precision_at_3", "recall_at_3", "ndcg_at_3", "map_at_3"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]
    assert 0 <= m["recall_at_3_ci_low"] < m["recall_at_3"] < m["recall_at_3_ci_high"] <= 0.75
    assert "precision_at_3_ci_low" not in ranking_metrics(recommended, relevant, k=3, catalogue_size=10)


def test_each_metrics_interval_is_its_own_bootstrap_interval_with_one_draw_for_all() -> None:
    rng = np.random.default_rng(3)
    per_user = {
        "precision_at_10": rng.beta(1.0, 3.0, 500),
        "recall_at_10": rng.beta(2.0, 2.0, 500),
        "ndcg_at_10": rng.beta(1.0, 9.0, 500),
    }
    summary = Scores(per_user, 0.5, 10).summary(0.9, prefix="test_")
    for name, values in per_user.items():
        assert (summary[f"test_{name}_ci_low"], summary[f"test_{name}_ci_high"]) == bootstrap_interval(
            values, 0.9
        )
    assert list(summary) == [
        f"test_{name}{part}" for name in per_user for part in ("", "_ci_low", "_ci_high")
    ] + ["test_coverage_at_10"]
    empty = Scores({name: np.array([]) for name in per_user}, 0.0, 10).summary(0.9)
    assert empty["ndcg_at_10_ci_low"] == empty["ndcg_at_10_ci_high"] == 0.0


def test_row_difference_is_setdiff_per_row() -> None:
    rows = sp.csr_matrix(
        (np.ones(7), ([0, 0, 0, 2, 2, 3, 3], [5, 1, 5, 0, 4, 2, 3])), shape=(5, 6)
    )  # row 0 names item 5 twice, row 1 and row 4 are empty
    taken = sp.csr_matrix((np.ones(3), ([0, 2, 4], [1, 0, 3])), shape=(5, 6))
    assert [items.tolist() for items in row_difference(rows, taken)] == [[5], [], [4], [2, 3], []]
    assert row_difference(rows[:0], taken[:0]) == []


def test_per_user_metrics_match_a_loop_over_users() -> None:
    rng = np.random.default_rng(3)
    for width, k in ((10, 10), (4, 10), (12, 5)):
        recommended = np.stack([rng.permutation(60)[:width] for _ in range(300)])
        recommended[rng.random(recommended.shape) < 0.1] = NO_ITEM
        relevant = [rng.choice(60, rng.integers(0, 15), replace=False) for _ in range(300)]
        expected: dict[str, list[float]] = {"precision": [], "recall": [], "ndcg": [], "map": []}
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        for row, rel in zip(recommended[:, :k], relevant, strict=True):
            if len(rel) == 0:
                continue
            hits = np.isin(row, rel) & (row != NO_ITEM)
            expected["precision"].append(hits.sum() / k)
            expected["recall"].append(hits.sum() / len(rel))
            expected["ndcg"].append(discounts[: len(row)][hits].sum() / discounts[: min(len(rel), k)].sum())
            at_hit = np.cumsum(hits) / np.arange(1, len(row) + 1)
            expected["map"].append(at_hit[hits].sum() / min(len(rel), k))
        got = per_user_metrics(recommended, relevant, k)
        for name, values in expected.items():
            np.testing.assert_allclose(got[f"{name}_at_{k}"], values, rtol=1e-12)
    assert all(len(v) == 0 for v in per_user_metrics(np.empty((0, 10), np.int64), [], 10).values())
