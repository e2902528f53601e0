from datetime import UTC, datetime

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline import drift
from recsys_pipeline.als import Embeddings, extended_item_weights, item_weights, train, weighted
from recsys_pipeline.config import AlsConfig, RefreshConfig, load_config
from recsys_pipeline.refresh import escalation_reasons, fold_in, rows_to_refresh

PARAMS = AlsConfig(factors=8, regularization=2.0, alpha=3.0, iterations=10, use_cg=False, random_state=0)


def exact_solution(fixed: np.ndarray, row: sp.csr_matrix, params: AlsConfig) -> np.ndarray:
    """Direct least squares for one row with the other side fixed (Hu, Koren & Volinsky, eq. 4):
    x = (YᵀY + λI + Yᵀ(C - I)Y)⁻¹ YᵀC p, with C = alpha x value on the row's items and p = 1 there."""
    y = fixed.astype(np.float64)
    items, confidence = row.indices, params.alpha * row.data.astype(np.float64)
    a = y.T @ y + params.regularization * np.eye(y.shape[1]) + (y[items].T * (confidence - 1)) @ y[items]
    b = y[items].T @ confidence
    return np.linalg.solve(a, b)


@pytest.fixture(scope="module")
def split(movielens):
    """A parent trained without the last 40 users and with 30 items hidden; the full matrix has them."""
    full = movielens.tocsr()
    hidden_items = np.arange(full.shape[1] - 30, full.shape[1])
    parent_matrix = full.tolil()
    parent_matrix[-40:, :] = 0
    parent_matrix[:, hidden_items] = 0
    parent, _ = train(parent_matrix.tocsr(), PARAMS)
    return full, parent


def test_folded_in_users_equal_the_exact_least_squares_solution(split) -> None:
    full, parent = split
    users = np.array([0, 5, 17, full.shape[0] - 1, full.shape[0] - 2])  # existing and brand-new users
    result = fold_in(parent, full, users, np.array([], dtype=np.int64), PARAMS, RefreshConfig(), None)
    vectors = result.dense_users(full.shape[0])
    items = parent.dense_items(full.shape[1])
    for user in users:
        np.testing.assert_allclose(
            vectors[user], exact_solution(items, full[user], PARAMS), rtol=1e-4, atol=1e-5
        )


def test_conjugate_gradient_fold_in_is_within_its_stated_tolerance(split) -> None:
    full, parent = split
    users = np.arange(full.shape[0] - 40, full.shape[0])  # new users: CG starts from zero
    items = parent.dense_items(full.shape[1])
    exact = np.array([exact_solution(items, full[u], PARAMS) for u in users])
    # Stated tolerance: with as many CG steps as factors, within 1e-3 relative (L2) of the exact solve.
    cg = fold_in(
        parent,
        full,
        users,
        np.array([], dtype=np.int64),
        PARAMS,
        RefreshConfig(solver="cg", cg_steps=8),
        None,
    )
    found = cg.dense_users(full.shape[0])[users]
    assert np.linalg.norm(found - exact) / np.linalg.norm(exact) < 1e-3
    three = fold_in(
        parent, full, users, np.array([], dtype=np.int64), PARAMS, RefreshConfig(solver="cg"), None
    )
    rough = three.dense_users(full.shape[0])[users]
    assert np.linalg.norm(rough - exact) / np.linalg.norm(exact) > 1e-3  # fewer steps: visibly inexact


def test_new_items_are_solved_against_fixed_user_factors_and_nothing_else_moves(split) -> None:
    full, parent = split
    new_items = np.arange(full.shape[1] - 30, full.shape[1])
    new_items = new_items[full.getnnz(axis=0)[new_items] > 0]
    result = fold_in(parent, full, np.array([3]), new_items, PARAMS, RefreshConfig(), None)
    users = parent.dense_users(full.shape[0])
    item_users = full.T.tocsr()
    refreshed_items = result.dense_items(full.shape[1])
    for item in new_items[:10]:
        np.testing.assert_allclose(
            refreshed_items[item], exact_solution(users, item_users[item], PARAMS), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(refreshed_items[parent.item_idx], parent.item_factors)
    untouched = np.setdiff1d(parent.user_idx, [3])
    np.testing.assert_array_equal(
        result.dense_users(full.shape[0])[untouched], parent.dense_users(full.shape[0])[untouched]
    )


def test_fold_in_solves_the_learned_dimensions_and_keeps_the_popularity_prior(movielens) -> None:
    params = PARAMS.model_copy(update={"popularity_weight": 0.3})
    full = movielens.tocsr()
    hidden_items = np.arange(full.shape[1] - 30, full.shape[1])
    parent_matrix = full.tolil()
    parent_matrix[:, hidden_items] = 0
    parent, _ = train(parent_matrix.tocsr(), params)
    assert parent.user_factors.shape[1] == params.factors + 1
    new_items = hidden_items[full.getnnz(axis=0)[hidden_items] > 0]
    users = np.array([0, 5, 17])
    result = fold_in(parent, full, users, new_items, params, RefreshConfig(), None)
    refreshed_users, refreshed_items = result.dense_users(full.shape[0]), result.dense_items(full.shape[1])
    # Users are solved against the learned item dimensions only (new items solved first); the prior
    # keeps its weight.
    learned_items = refreshed_items[:, : params.factors]
    for user in users:
        np.testing.assert_allclose(
            refreshed_users[user, : params.factors],
            exact_solution(learned_items, full[user], params),
            rtol=1e-4,
            atol=1e-5,
        )
    np.testing.assert_array_equal(refreshed_users[users, -1], np.float32(0.3))
    # Old items keep the popularity they were fitted beside; new ones get today's.
    np.testing.assert_array_equal(refreshed_items[parent.item_idx], parent.item_factors)
    np.testing.assert_allclose(
        refreshed_items[new_items, -1], np.log1p(np.asarray(full.sum(axis=0)).ravel()[new_items])
    )


def test_a_weighted_fold_in_solves_rows_weighted_as_the_parent_was_trained(movielens) -> None:
    params = PARAMS.model_copy(update={"weighting": "bm25"})
    full = movielens.tocsr()
    hidden_items = np.arange(full.shape[1] - 30, full.shape[1])
    parent_matrix = full.tolil()
    parent_matrix[-40:, :] = 0
    parent_matrix[:, hidden_items] = 0
    parent_matrix = parent_matrix.tocsr()
    parent, _ = train(parent_matrix, params)
    stored = item_weights(parent_matrix, params)
    weights = extended_item_weights(stored, parent.item_idx, full, params)
    # Items the parent knew keep the weights it was trained with; new ones get today's.
    np.testing.assert_array_equal(weights[parent.item_idx], stored[parent.item_idx])
    np.testing.assert_array_equal(weights[hidden_items], item_weights(full, params)[hidden_items])
    users = np.array([0, 5, full.shape[0] - 1])
    new_items = hidden_items[full.getnnz(axis=0)[hidden_items] > 0]
    result = fold_in(parent, full, users, new_items, params, RefreshConfig(), weights)
    confidences = weighted(full, params, weights)
    # New items are solved first, against the parent's users, from their weighted columns; then the
    # users against every item.
    refreshed_items = result.dense_items(full.shape[1])
    item_confidences = confidences.T.tocsr()
    for item in new_items[:10]:
        np.testing.assert_allclose(
            refreshed_items[item],
            exact_solution(parent.dense_users(full.shape[0]), item_confidences[item], params),
            rtol=1e-4,
            atol=1e-5,
        )
    for user in users:
        np.testing.assert_allclose(
            result.dense_users(full.shape[0])[user],
            exact_solution(refreshed_items, confidences[user], params),
            rtol=1e-4,
            atol=1e-5,
        )


def test_rows_to_refresh_are_active_users_plus_rows_without_a_vector(split) -> None:
    full, parent = split
    users, new_items = rows_to_refresh(full, parent, recent_users=np.array([2, 4, full.shape[0] + 5]))
    assert {2, 4} <= set(users) and full.shape[0] + 5 not in users
    np.testing.assert_array_equal(np.setdiff1d(users, [2, 4]), np.arange(full.shape[0] - 40, full.shape[0]))
    hidden = np.arange(full.shape[1] - 30, full.shape[1])
    np.testing.assert_array_equal(new_items, hidden[full.getnnz(axis=0)[hidden] > 0])


def quiet(**changes):
    """Arguments for escalation_reasons under which nothing escalates, with some replaced."""
    config = load_config()
    arguments = {
        "new_items": 5,
        "catalogue_items": 1000,
        "parent_data_end": datetime(1998, 4, 1, tzinfo=UTC),
        "run_end": datetime(1998, 4, 3, tzinfo=UTC),
        "drift_metrics": None,
        "run_config": config,
    }
    return arguments | changes


def test_nothing_escalates_when_every_rule_holds() -> None:
    assert escalation_reasons(**quiet()) == []


def test_too_many_new_items_escalate() -> None:
    reasons = escalation_reasons(**quiet(new_items=150))
    assert len(reasons) == 1 and "150 new items are 15.0% of the catalogue" in reasons[0]


def test_an_old_weekly_parent_escalates() -> None:
    reasons = escalation_reasons(**quiet(run_end=datetime(1998, 4, 12, tzinfo=UTC)))
    assert len(reasons) == 1 and "11.0 days before this run's" in reasons[0]


def test_drift_from_the_weekly_parent_escalates_but_a_rotation_does_not(split) -> None:
    _, parent = split
    config = load_config()
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))
    rotated = Embeddings(
        parent.user_idx, parent.user_factors @ rotation, parent.item_idx, parent.item_factors @ rotation
    )
    same = drift.compare(parent, rotated, config.drift.k, 500, 500).metrics
    assert escalation_reasons(**quiet(drift_metrics=same)) == []
    rng = np.random.default_rng(1)
    scrambled = Embeddings(
        parent.user_idx,
        rng.permutation(parent.user_factors),
        parent.item_idx,
        rng.permutation(parent.item_factors),
    )
    moved = drift.compare(parent, scrambled, config.drift.k, 500, 500).metrics
    reasons = escalation_reasons(**quiet(drift_metrics=moved))
    assert reasons and all(reason.startswith("drift from the weekly parent") for reason in reasons)
    assert any("drift_rec_overlap" in reason for reason in reasons)


def test_a_cold_item_with_interactions_now_gets_a_learned_vector_and_drift_ignores_the_swap(split) -> None:
    from recsys_pipeline.content import with_content_vectors

    full, parent = split
    hidden = np.arange(full.shape[1] - 30, full.shape[1])
    rng = np.random.default_rng(0)
    mapped = rng.normal(scale=0.1, size=(len(hidden), parent.item_factors.shape[1])).astype(np.float32)
    served = with_content_vectors(parent, hidden, mapped, np.zeros(full.shape[1]), None)
    assert np.array_equal(served.cold_item_idx, hidden)

    users, new_items = rows_to_refresh(full, served, np.array([], dtype=np.int64))
    with_data = hidden[full[:, hidden].getnnz(axis=0) > 0]
    assert np.array_equal(new_items, with_data)  # cold items that now have data are solved
    refreshed = fold_in(served, full, users, new_items, PARAMS, RefreshConfig(), None)
    assert np.array_equal(refreshed.cold_item_idx, np.setdiff1d(hidden, with_data))
    rows = np.searchsorted(refreshed.item_idx, with_data)
    assert not np.allclose(refreshed.item_factors[rows], mapped[np.isin(hidden, with_data)])
    # Compared on learned vectors only, the swap is not drift: the learned ones did not move.
    report = drift.compare(served, refreshed, 10, 500, 200)
    assert report.metrics["drift_shared_items"] == len(parent.item_idx)
    assert report.metrics["drift_aligned_cosine"] > 0.999


def test_a_hybrid_blends_sparse_items_towards_their_content_vector(split) -> None:
    from recsys_pipeline.content import with_content_vectors

    _, parent = split
    items = parent.item_idx[:2]
    mapped = np.ones((2, parent.item_factors.shape[1]), dtype=np.float32)
    counts = np.zeros(items.max() + 1)
    counts[items] = [0, 15]
    blended = with_content_vectors(parent, items, mapped, counts, hybrid_half_count=5.0)
    assert len(blended.cold_item_idx) == 0
    np.testing.assert_allclose(blended.item_factors[0], mapped[0])  # no interactions: all content
    expected = 0.75 * parent.item_factors[1] + 0.25 * mapped[1]  # 15 interactions: 5 / (5 + 15) content
    np.testing.assert_allclose(blended.item_factors[1], expected, rtol=1e-5)
