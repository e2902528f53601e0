"""The one top-k kernel every ranking goes through: order, exclusions, padding, bounded memory."""

import tracemalloc

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.ranking import NO_ITEM, dot_top_k, first_unseen, popular_items, popular_unseen, top_k


def test_top_k_orders_best_first_and_marks_excluded_entries() -> None:
    scores = np.array([[0.1, 0.9, -np.inf, 0.5], [-np.inf, -np.inf, 0.2, -np.inf]], dtype=np.float32)
    columns, best = top_k(scores, 3)
    assert columns.tolist() == [[1, 3, 0], [2, NO_ITEM, NO_ITEM]]
    np.testing.assert_allclose(best[0], [0.9, 0.5, 0.1])


def test_top_k_never_returns_more_columns_than_exist() -> None:
    columns, _ = top_k(np.ones((2, 3), dtype=np.float32), 10)
    assert columns.shape == (2, 3)


def test_dot_top_k_equals_a_full_sort_with_masks_and_seen_items() -> None:
    rng = np.random.default_rng(0)
    queries, vectors = rng.normal(size=(50, 8)), rng.normal(size=(300, 8)).astype(np.float32)
    allowed = rng.random(300) > 0.2
    seen = sp.random(50, 300, density=0.05, random_state=1, format="csr")
    columns, scores = dot_top_k(queries, vectors, 7, allowed=allowed, seen=seen, batch_size=16)
    full = queries @ vectors.T
    full[:, ~allowed] = -np.inf
    full[seen.nonzero()] = -np.inf
    expected = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(columns, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5)


def test_popular_unseen_skips_history_and_items_nobody_used() -> None:
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 1]]))
    popularity = np.array([5, 3, 0, 4])
    assert popular_items(popularity).tolist() == [0, 3, 1]
    assert popular_unseen(popularity, seen, 3).tolist() == [[3, 1, NO_ITEM], [0, 1, NO_ITEM]]


def test_first_unseen_keeps_scores_aligned_with_items() -> None:
    items, scores = first_unseen(
        np.array([4, 2, 7, NO_ITEM]), np.array([0.9, 0.8, 0.7, -1.0]), np.array([2]), 3
    )
    assert items.tolist() == [4, 7] and scores.tolist() == [0.9, 0.7]


def test_memory_is_bounded_by_the_batch_not_the_number_of_queries() -> None:
    """50k users against 200k items would be 40 GB of scores at once; batches keep it to a few MB each."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200_000, 4)).astype(np.float32)
    queries = rng.normal(size=(2_000, 4)).astype(np.float32)
    tracemalloc.start()
    columns, _ = dot_top_k(queries, vectors, 10, batch_size=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert columns.shape == (2_000, 10)
    # One batch: 64 x 200k float32 scores (51 MB) plus the partition's positions of a chunk.
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB"
