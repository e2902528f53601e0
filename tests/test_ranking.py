"""The one top-k kernel every ranking goes through: order, exclusions, padding, bounded memory."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline.ranking import (
    NO_ITEM,
    dot_top_k,
    first_unseen,
    first_unseen_rows,
    popular_items,
    popular_unseen,
    top_k,
)


def test_top_k_orders_best_first_and_marks_excluded_entries() -> None:
    scores = np.array([[0.1, 0.9, -np.inf, 0.5], [-np.inf, -np.inf, 0.2, -np.inf]], dtype=np.float32)
    columns, best = top_k(scores, 3)
    assert columns.tolist() == [[1, 3, 0], [2, NO_ITEM, NO_ITEM]]
    np.testing.assert_allclose(best[0], [0.9, 0.5, 0.1])


def test_top_k_never_returns_more_columns_than_exist() -> None:
    columns, _ = top_k(np.ones((2, 3), dtype=np.float32), 10)
    assert columns.shape == (2, 3)


@pytest.mark.parametrize("threads", [1, 3])
def test_dot_top_k_equals_a_full_sort_with_masks_and_seen_items(threads: int) -> None:
    """Batches ranked one after another or by threads at once (each writing its own rows)."""
    rng = np.random.default_rng(0)
    queries, vectors = rng.normal(size=(50, 8)), rng.normal(size=(300, 8)).astype(np.float32)
    allowed = rng.random(300) > 0.2
    seen = sp.random(50, 300, density=0.05, random_state=1, format="csr")
    columns, scores = dot_top_k(
        queries, vectors, 7, allowed=allowed, seen=seen, batch_size=16, threads=threads
    )
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


def test_popular_unseen_is_each_rows_first_unseen_of_the_popular_list() -> None:
    """Rows whose history hides more of the popular list than k (so the shared head leaves them short)
    still get their k, as a row looked up alone would."""
    rng = np.random.default_rng(3)
    n_rows, n_items, k = 40, 60, 4
    popularity = rng.integers(0, 50, n_items)
    popular = popular_items(popularity)
    seen = sp.random(n_rows, n_items, density=0.1, random_state=2, format="lil")
    seen[5, popular[:30]] = 1  # the head and far beyond it seen
    seen[6, popular[1 : 2 * k + 1]] = 1  # all of the head but its first item
    seen = seen.tocsr()
    expected = [
        first_unseen(popular, popular, seen.indices[seen.indptr[r] : seen.indptr[r + 1]], k)[0].tolist()
        for r in range(n_rows)
    ]
    got = popular_unseen(popularity, seen, k)
    assert [row[row != NO_ITEM].tolist() for row in got] == expected
    assert got[5].tolist() == popular[30:34].tolist()


def test_first_unseen_keeps_scores_aligned_with_items() -> None:
    items, scores = first_unseen(
        np.array([4, 2, 7, NO_ITEM]), np.array([0.9, 0.8, 0.7, -1.0]), np.array([2]), 3
    )
    assert items.tolist() == [4, 7] and scores.tolist() == [0.9, 0.7]


def test_first_unseen_rows_matches_first_unseen_per_row() -> None:
    """The whole-batch lookup keeps exactly what the per-row one keeps, with a history whose indices
    are not sorted and rows that keep fewer than k."""
    rng = np.random.default_rng(5)
    n_rows, n_items, width, k = 30, 50, 12, 5
    items = np.stack([rng.permutation(n_items)[:width] for _ in range(n_rows)])
    items[3, 4:] = NO_ITEM
    scores = -np.sort(-rng.random((n_rows, width)), axis=1).astype(np.float32)
    seen = sp.random(n_rows, n_items, density=0.4, random_state=2, format="csr")
    seen.indices = seen.indices.copy()
    for row in range(n_rows):  # reverse each row's indices: valid CSR, unsorted
        a, b = seen.indptr[row], seen.indptr[row + 1]
        seen.indices[a:b], seen.data[a:b] = seen.indices[a:b][::-1], seen.data[a:b][::-1]
    seen.has_sorted_indices = False
    picked, picked_scores, counts = first_unseen_rows(items, scores, seen, k)
    for row in range(n_rows):
        history = seen.indices[seen.indptr[row] : seen.indptr[row + 1]]
        expected, expected_scores = first_unseen(items[row], scores[row], history, k)
        assert counts[row] == len(expected)
        assert picked[row, : counts[row]].tolist() == expected.tolist()
        np.testing.assert_array_equal(picked_scores[row, : counts[row]], expected_scores)
        assert (picked[row, counts[row] :] == NO_ITEM).all()
    assert counts.min() < k


def test_memory_is_bounded_by_the_batch_not_the_number_of_queries() -> None:
    """50k users against 200k items would be 40 GB of scores at once; batches keep it to a few MB each."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200_000, 4)).astype(np.float32)
    queries = rng.normal(size=(2_000, 4)).astype(np.float32)
    tracemalloc.start()
    columns, _ = dot_top_k(queries, vectors, 10, batch_size=64, threads=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert columns.shape == (2_000, 10)
    # One batch per thread: 64 x 200k float32 scores (51 MB) plus the partition's positions of a chunk.
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_top_k_over_wide_rows_prunes_to_blocks_and_stays_exact() -> None:
    """Rows wide enough to be pruned to their best blocks (a tail that fills no block included) give
    the scores a full sort gives, ties and excluded entries too."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(40, 64 * 300 + 17)).astype(np.float32)
    scores[0, :] = 1.0  # every column ties
    scores[1, 5:] = -np.inf  # fewer finite entries than k
    scores[2, -3:] = 50.0  # the best scores sit in the tail
    scores[3, :64] = 9.0  # adjacent columns hold the whole top k
    scores[4] = np.round(scores[4])  # ties across blocks
    scores[5, : 64 * 300 : 300] = 9.0  # one block (every 300th column) holds the whole top k
    columns, best = top_k(scores, 10)
    expected = -np.sort(-scores, axis=1)[:, :10]
    np.testing.assert_array_equal(best, expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(
        np.take_along_axis(scores, np.where(finite, columns, 0), axis=1)[finite], expected[finite]
    )
    assert (columns[~finite] == NO_ITEM).all() and (columns[1, :5] >= 0).all()
    assert len({tuple(row) for row in columns[[0]]}) == 1 and len(set(columns[0])) == 10
