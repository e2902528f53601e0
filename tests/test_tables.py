import numpy as np

from recsys_pipeline.tables import Triples


def test_a_matrix_of_some_users_holds_their_rows_whole_and_no_other_rows() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, n_pairs = 30, 20, 400
    triples = Triples(
        rng.integers(0, n_users, n_pairs).astype(np.int32),
        rng.integers(0, n_items, n_pairs).astype(np.int32),
        rng.random(n_pairs).astype(np.float32),
    )
    users = rng.random(n_users) < 0.3
    whole, some = triples.to_csr(n_users, n_items), triples.to_csr(n_users, n_items, users)
    assert some.shape == whole.shape
    np.testing.assert_allclose(some[users].toarray(), whole[users].toarray())
    assert some[~users].nnz == 0 and whole[~users].nnz > 0
