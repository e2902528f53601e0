import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline.als import (
    ImplicitTrainer,
    ModelFitError,
    SparkMllibTrainer,
    implicit_loss,
    item_weights,
    train,
    warm_start,
    weighted,
)
from recsys_pipeline.config import AlsConfig
from recsys_pipeline.embeddings import Embeddings, read_embeddings, write_embeddings
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.train import run_training
from tests.conftest import write_interactions

CONFIG = AlsConfig(factors=4, regularization=0.1, alpha=10.0, iterations=15, use_cg=False, random_state=0)
BACKENDS = ["implicit", pytest.param("spark", marks=pytest.mark.spark)]


@pytest.fixture(params=BACKENDS)
def fit(request):
    """train() bound to one backend: every contract test below runs on both."""
    backend = request.param
    spark = request.getfixturevalue("spark") if backend == "spark" else None

    def fit_with(matrix: sp.csr_matrix, params: AlsConfig = CONFIG):
        return train(matrix, params.model_copy(update={"backend": backend}), spark)

    return fit_with


def checker_board(n: int) -> sp.csr_matrix:
    """Two blocks of users and items, like implicit's contract test: user u likes items of u's parity."""
    rows, cols = np.nonzero((np.add.outer(np.arange(n), np.arange(n)) % 2) == 0)
    keep = rows != cols  # withhold the diagonal: each user's own item must come back first
    return sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])), shape=(n, n))


def test_withheld_item_of_the_users_block_ranks_above_other_block(fit) -> None:
    matrix = checker_board(20)
    embeddings, losses = fit(matrix)
    scores = embeddings.user_factors @ embeddings.item_factors.T
    for user in range(20):
        other_block = [i for i in range(20) if (i + user) % 2 == 1]
        assert scores[user, user] > scores[user, other_block].max()
    assert losses and all(np.isfinite(losses))
    assert losses[-1] <= losses[0]


def test_embeddings_cover_only_users_and_items_with_data_and_round_trip(fit, tmp_path) -> None:
    matrix = checker_board(12).tolil()
    matrix[3, :] = 0
    matrix[:, 7] = 0
    embeddings, _ = fit(matrix.tocsr())
    assert 3 not in embeddings.user_idx and 7 not in embeddings.item_idx
    assert embeddings.user_factors.shape == (11, 4) and embeddings.item_factors.shape == (11, 4)
    assert embeddings.user_factors.dtype == np.float32 and np.abs(embeddings.item_factors).sum() > 0
    write_embeddings(tmp_path, embeddings)
    loaded = read_embeddings(tmp_path)
    np.testing.assert_array_equal(loaded.item_idx, embeddings.item_idx)
    np.testing.assert_allclose(loaded.user_factors, embeddings.user_factors)
    assert np.all(loaded.dense_users(12)[3] == 0)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (sp.csr_matrix((5, 5), dtype=np.float32), "empty"),
        (sp.csr_matrix(np.array([[np.nan, 1.0], [1.0, 1.0]], dtype=np.float32)), "NaN"),
        (sp.csr_matrix(np.array([[np.inf, 1.0], [1.0, 1.0]], dtype=np.float32)), "NaN or infinite"),
        (sp.csr_matrix(np.array([[-1.0, 1.0], [1.0, 1.0]], dtype=np.float32)), "negative"),
        (sp.csr_matrix(np.eye(3, dtype=np.float32)), "factors=4 exceeds"),
    ],
)
def test_degenerate_inputs_fail_with_a_clear_error(fit, matrix: sp.csr_matrix, message: str) -> None:
    with pytest.raises(ModelFitError, match=message):
        fit(matrix)


def test_spark_backend_without_a_session_says_how_to_run_it() -> None:
    with pytest.raises(ModelFitError, match="run_stages.py"):
        train(checker_board(10), CONFIG.model_copy(update={"backend": "spark"}))


def test_loss_routine_used_for_spark_matches_implicits_own_report() -> None:
    matrix = checker_board(16)
    params = CONFIG.model_copy(update={"alpha": 3.0, "regularization": 0.5})
    user_factors, item_factors, losses = ImplicitTrainer().fit(matrix, params)
    assert implicit_loss(matrix, user_factors, item_factors, params) == pytest.approx(losses[-1], rel=1e-5)


def test_training_stage_records_the_hyperparameters_it_used(make_config) -> None:
    config = make_config(als__factors=4, als__iterations=5)
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__t")
    write_interactions(run, checker_board(20))
    metrics = run_training(run)
    # Read back against another config: the values must come from the model folder, not the config.
    recorded = run.artifacts.trained.trained_params()
    assert recorded.backend == "implicit"
    assert recorded.hyperparameters() == {
        "factors": 4,
        "regularization": config.als.regularization,
        "alpha": config.als.alpha,
        "iterations": 5,
        "popularity_weight": config.als.popularity_weight,
        "weighting": config.als.weighting,
        "bm25_k1": config.als.bm25_k1,
        "bm25_idf_exponent": config.als.bm25_idf_exponent,
    }
    other = RunContext.create(make_config(), run.dag_id, run.interval_start, run.interval_end, run.run_id)
    assert other.artifacts.trained.trained_params().factors == 4
    assert len(run.artifacts.trained.training_losses()) == 5
    assert metrics["trained_users"] == 20 and run.artifacts.trained.sweep_summary() is None


def test_dense_views_place_vectors_by_index() -> None:
    embeddings = Embeddings(
        np.array([2]), np.ones((1, 3), np.float32), np.array([0]), np.ones((1, 3), np.float32)
    )
    dense = embeddings.dense_users(4)
    assert dense.shape == (4, 3) and dense[2].sum() == 3 and dense[[0, 1, 3]].sum() == 0


def test_the_popularity_prior_adds_weight_x_log_popularity_to_every_score(movielens) -> None:
    plain_params = AlsConfig(factors=8, iterations=5, random_state=0)
    plain, _ = train(movielens, plain_params)
    with_prior, _ = train(movielens, plain_params.model_copy(update={"popularity_weight": 0.5}))
    assert with_prior.item_factors.shape[1] == 9 and np.all(with_prior.user_factors[:, -1] == 0.5)
    popularity = np.log1p(np.asarray(movielens.sum(axis=0)).ravel())[with_prior.item_idx]
    np.testing.assert_allclose(
        with_prior.user_factors @ with_prior.item_factors.T,
        plain.user_factors @ plain.item_factors.T + 0.5 * popularity[None, :],
        rtol=1e-4,
        atol=1e-4,
    )
    # The loss is ALS's own objective: the prior's dimension is not part of it.
    assert implicit_loss(
        movielens,
        with_prior.dense_users(movielens.shape[0]),
        with_prior.dense_items(movielens.shape[1]),
        plain_params,
    ) == pytest.approx(
        implicit_loss(
            movielens,
            plain.dense_users(movielens.shape[0]),
            plain.dense_items(movielens.shape[1]),
            plain_params,
        ),
        rel=1e-5,
    )


def test_the_prior_dimension_is_known_after_a_round_trip_and_left_out_of_the_geometry(
    tmp_path, movielens
) -> None:
    embeddings, _ = train(movielens, AlsConfig(factors=8, iterations=3, popularity_weight=0.5))
    write_embeddings(tmp_path, embeddings)
    read = read_embeddings(tmp_path)
    assert read.prior_dims == 1 and read.item_factors.shape[1] == 9
    assert read.learned().item_factors.shape[1] == 8 and read.warm_items().prior_dims == 1
    np.testing.assert_array_equal(read.learned().user_factors, embeddings.user_factors[:, :8])


def test_bm25_weighting_is_implicits_bm25_weight_without_length_normalisation(movielens) -> None:
    from implicit.nearest_neighbours import bm25_weight

    matrix = movielens.tocsr().astype(np.float32)
    matrix.data *= np.random.default_rng(0).integers(1, 6, matrix.nnz)  # confidences, not only ones
    params = AlsConfig(weighting="bm25", bm25_k1=1.2)
    weights = item_weights(matrix, params)
    ours = weighted(matrix, params, weights)
    theirs = bm25_weight(matrix, K1=1.2, B=0.0).tocsr()
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), rtol=1e-5, atol=1e-6)
    assert weighted(matrix, AlsConfig(weighting="none"), item_weights(matrix, AlsConfig())) is matrix
    # The rarer an item, the more each of its pairs counts; the input is left as it was.
    counts = matrix.getnnz(axis=0)
    assert weights[np.argmin(np.where(counts > 0, counts, 10**9))] > weights[np.argmax(counts)] >= 0
    assert matrix.data.max() > 1.2 + 1
    # A steeper weight is the IDF to a power: rare items' pairs count more, popular ones' less.
    steeper = item_weights(matrix, params.model_copy(update={"bm25_idf_exponent": 1.5}))
    np.testing.assert_allclose(steeper, weights**1.5, rtol=1e-5)


def test_a_fit_that_does_not_track_its_loss_is_the_same_fit(movielens) -> None:
    """A sweep's fits skip the loss (a pass over the matrix per iteration): nothing else changes."""
    matrix = movielens.tocsr()
    params = AlsConfig(factors=8, regularization=2.0, alpha=3.0, iterations=3, random_state=0)
    tracked, losses = train(matrix, params)
    untracked, no_losses = train(matrix, params, track_loss=False)
    assert len(losses) == 3 and no_losses == []
    np.testing.assert_array_equal(tracked.user_factors, untracked.user_factors)
    np.testing.assert_array_equal(tracked.item_factors, untracked.item_factors)


def test_training_fits_the_weighted_confidences(movielens) -> None:
    """A BM25-weighted model is the unweighted model of the BM25-weighted matrix: the weighting, and
    nothing else, reaches the trainer (and the raw matrix gives another model)."""
    matrix = movielens.tocsr()
    params = AlsConfig(factors=8, regularization=2.0, alpha=3.0, iterations=5, weighting="bm25")
    embeddings, _ = train(matrix, params)
    unweighted = params.model_copy(update={"weighting": "none"})
    same, _ = train(weighted(matrix, params, item_weights(matrix, params)), unweighted)
    raw, _ = train(matrix, unweighted)
    np.testing.assert_allclose(embeddings.user_factors, same.user_factors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embeddings.item_factors, same.item_factors, rtol=1e-5, atol=1e-6)
    assert not np.allclose(embeddings.user_factors, raw.user_factors, atol=1e-3)


def test_a_warm_start_resumes_last_weeks_solution_and_starts_new_rows_as_implicit_does(movielens) -> None:
    params = AlsConfig(
        factors=8,
        regularization=1.0,
        alpha=2.0,
        popularity_weight=0.25,
        warm_start_iterations=2,
        random_state=0,
    )
    last_week, last_losses = train(movielens, params)
    # This week: the same pairs and one new user (the last row), who copies the first user.
    grown = sp.vstack([movielens, movielens[:1]]).tocsr()
    start = warm_start(last_week, params, params, grown.shape)
    assert start is not None and start.iterations == 2
    assert start.user_factors.shape == (grown.shape[0], 8) and start.item_factors.shape == (grown.shape[1], 8)
    np.testing.assert_array_equal(start.item_factors[last_week.item_idx], last_week.item_factors[:, :8])
    assert 0 <= start.user_factors[-1].min() and start.user_factors[-1].max() < 0.01
    warm, warm_losses = train(grown, params, start=start)
    _, short_losses = train(grown, params.model_copy(update={"iterations": 2}))
    assert len(warm_losses) == 2
    assert warm_losses[-1] < short_losses[-1] and warm_losses[-1] == pytest.approx(last_losses[-1], rel=0.02)
    assert grown.shape[0] - 1 in warm.user_idx and warm.item_factors.shape[1] == 9  # the prior's too
    scores = warm.user_factors @ warm.item_factors.T
    assert np.corrcoef(scores[-1], scores[0])[0, 1] > 0.99  # the new user solved as the first


@pytest.mark.parametrize(
    "change",
    [
        {"alpha": 4.0},
        {"regularization": 2.0},
        {"weighting": "none"},
        {"bm25_idf_exponent": 1.5},
        {"factors": 3},
        {"backend": "spark"},
    ],
)
def test_a_warm_start_needs_the_same_problem_and_a_backend_that_resumes(change) -> None:
    params = AlsConfig(factors=2, weighting="bm25", warm_start_iterations=3)
    start = Embeddings(np.array([0]), np.ones((1, 2), np.float32), np.array([1]), np.ones((1, 2), np.float32))
    assert warm_start(start, params, params.model_copy(update={"popularity_weight": 0.5}), (2, 2)) is not None
    assert warm_start(start, params, params.model_copy(update=change), (2, 2)) is None
    assert (
        warm_start(start, params, params.model_copy(update={"warm_start_iterations": None}), (2, 2)) is None
    )


def test_spark_mllib_refuses_a_warm_start() -> None:
    start = warm_start(
        Embeddings(np.array([0]), np.ones((1, 4), np.float32), np.array([0]), np.ones((1, 4), np.float32)),
        CONFIG,
        CONFIG.model_copy(update={"warm_start_iterations": 2}),
        (20, 20),
    )
    assert start is not None
    with pytest.raises(ModelFitError, match="cannot start from given factors"):
        SparkMllibTrainer(None).fit(checker_board(20), CONFIG, start)  # type: ignore[arg-type]
