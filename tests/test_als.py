import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline.als import Embeddings, ModelFitError, read_embeddings, train, write_embeddings
from recsys_pipeline.config import AlsConfig

CONFIG = AlsConfig(factors=4, regularization=0.01, alpha=1.0, iterations=15, use_cg=False, random_state=0)


def checker_board(n: int) -> sp.csr_matrix:
    """Two blocks of users and items, like implicit's contract test: user u likes items of u's parity."""
    rows, cols = np.nonzero((np.add.outer(np.arange(n), np.arange(n)) % 2) == 0)
    keep = rows != cols  # withhold the diagonal: each user's own item must come back first
    return sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])), shape=(n, n))


def test_withheld_item_of_the_users_block_ranks_above_other_block() -> None:
    matrix = checker_board(20)
    embeddings, losses = train(matrix, CONFIG)
    scores = embeddings.user_factors @ embeddings.item_factors.T
    for user in range(20):
        other_block = [i for i in range(20) if (i + user) % 2 == 1]
        assert scores[user, user] > scores[user, other_block].max()
    assert len(losses) == CONFIG.iterations
    assert losses[-1] <= losses[0]


def test_embeddings_cover_only_users_and_items_with_data_and_round_trip(tmp_path) -> None:
    matrix = checker_board(12).tolil()
    matrix[3, :] = 0
    matrix[:, 7] = 0
    embeddings, _ = train(matrix.tocsr(), CONFIG)
    assert 3 not in embeddings.user_idx and 7 not in embeddings.item_idx
    assert embeddings.user_factors.shape == (11, 4) and embeddings.item_factors.shape == (11, 4)
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
def test_degenerate_inputs_fail_with_a_clear_error(matrix: sp.csr_matrix, message: str) -> None:
    with pytest.raises(ModelFitError, match=message):
        train(matrix, CONFIG)


def test_dense_views_place_vectors_by_index() -> None:
    embeddings = Embeddings(
        np.array([2]), np.ones((1, 3), np.float32), np.array([0]), np.ones((1, 3), np.float32)
    )
    dense = embeddings.dense_users(4)
    assert dense.shape == (4, 3) and dense[2].sum() == 3 and dense[[0, 1, 3]].sum() == 0
