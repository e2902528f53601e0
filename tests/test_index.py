import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys_pipeline.config import IndexConfig
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.index import (
    MAX_ITEMS_PER_LEAF,
    ExactIndex,
    IndexIntegrityError,
    ItemIndex,
    ScannIndex,
    SearchParams,
    exact_top_k,
    load_index,
    measure,
    recall_queries,
    search_params,
    update,
)


def planted(n_items: int = 5000, dims: int = 16, n_queries: int = 200, seed: int = 0):
    """Items in clusters and queries near cluster centres: a clear true top-k for every query."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dims))
    items = (centres[rng.integers(0, 50, n_items)] + 0.3 * rng.normal(size=(n_items, dims))).astype(
        np.float32
    )
    queries = (centres[rng.integers(0, 50, n_queries)] + 0.1 * rng.normal(size=(n_queries, dims))).astype(
        np.float32
    )
    return items, queries


def test_small_catalogues_use_exact_scoring_that_equals_brute_force() -> None:
    items, queries = planted(800)
    params = search_params(len(items), IndexConfig())
    assert params.num_leaves is None
    item_idx = np.arange(len(items)) * 3 + 1  # dense ids need not be row numbers
    index = ScannIndex.build(item_idx, items, params, k=10)
    found, scores = index.search(queries, 10)
    truth = item_idx[exact_top_k(queries, items, 10)]
    np.testing.assert_array_equal(found, truth)
    np.testing.assert_allclose(scores, np.sort(queries @ items.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_tree_and_hashing_index_reaches_recall_threshold_on_planted_data() -> None:
    items, queries = planted(20_000)
    params = search_params(len(items), IndexConfig(brute_force_below=1000, leaves_to_search=30))
    assert params.num_leaves == int(np.sqrt(len(items)))
    index = ScannIndex.build(np.arange(len(items)), items, params, k=10)
    assert measure(index, np.arange(len(items)), items, queries, 10)["index_recall_at_10"] >= 0.95


def test_a_large_catalogue_gets_leaves_of_at_most_a_thousand_items() -> None:
    # sqrt(n) leaves hold ~3,200 items at 10M: recall then needed half of them searched (see
    # MAX_ITEMS_PER_LEAF); the catalogue is not built here, only its tree's shape.
    for n_items in (1_000_000, 10_000_000, 50_000_000):
        leaves = search_params(n_items, IndexConfig()).num_leaves
        assert leaves is not None and n_items / leaves <= MAX_ITEMS_PER_LEAF
        assert leaves >= int(np.sqrt(n_items))


@pytest.fixture
def saved_index(tmp_path: Path) -> tuple[Path, ScannIndex, np.ndarray]:
    items, queries = planted(3000)
    index = ScannIndex.build(np.arange(len(items)), items, SearchParams(50, 10, 100), k=10)
    index.save(tmp_path / "index")
    return tmp_path / "index", index, queries


def test_index_copied_elsewhere_and_read_only_loads_and_answers_the_same(saved_index, tmp_path: Path) -> None:
    directory, index, queries = saved_index
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(directory, copy)
    shutil.rmtree(directory)
    for path in [copy, *copy.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        loaded = load_index(copy)
        np.testing.assert_array_equal(loaded.search(queries, 10)[0], index.search(queries, 10)[0])
    finally:
        copy.chmod(0o755)


def test_missing_file_is_rejected_with_a_clear_error(saved_index) -> None:
    directory, _, _ = saved_index
    (directory / "dataset.npy").unlink()
    with pytest.raises(IndexIntegrityError, match="dataset.npy .* missing"):
        load_index(directory)


def test_tampered_file_is_rejected_with_a_clear_error(saved_index) -> None:
    directory, _, _ = saved_index
    with (directory / "dataset.npy").open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(IndexIntegrityError, match="dataset.npy .* does not match"):
        load_index(directory)


def test_missing_manifest_is_rejected(saved_index) -> None:
    directory, _, _ = saved_index
    (directory / "manifest.json").unlink()
    with pytest.raises(IndexIntegrityError, match="no manifest.json"):
        load_index(directory)


def test_cosine_metric_ranks_by_angle_not_norm() -> None:
    from recsys_pipeline.index import build_tuned

    items = np.array([[10.0, 10.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    query = np.array([[1.0, 0.05]], dtype=np.float32)
    dot_index, _, _ = build_tuned(np.arange(3), items, query, IndexConfig(metric="dot_product"), k=1)
    cosine_index, metrics, _ = build_tuned(np.arange(3), items, query, IndexConfig(metric="cosine"), k=1)
    assert dot_index.search(query, 1)[0].tolist() == [[0]]
    assert cosine_index.search(query, 1)[0].tolist() == [[1]]
    assert metrics["index_recall_at_1"] == 1.0


def test_the_search_setting_is_the_fastest_measured_point_within_recall_and_latency() -> None:
    from recsys_pipeline.index import build_tuned

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    items = (centres[rng.integers(0, 40, 30_000)] + 0.5 * rng.normal(size=(30_000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, 300)] + 0.5 * rng.normal(size=(300, 16))).astype(np.float32)
    config = IndexConfig(brute_force_below=1000, max_p99_ms=1000.0)
    index, metrics, curve = build_tuned(np.arange(len(items)), items, queries, config, 10)
    assert len(curve) > 1 and metrics["index_recall_at_10"] >= 0.95
    assert metrics["index_p99_ms"] >= metrics["index_p50_ms"] > 0
    chosen = max((p for p in curve if p.recall >= 0.95), key=lambda p: p.qps)
    assert index.params == chosen.params and metrics["index_qps"] == chosen.qps
    # Per reorder depth, searching more leaves never loses recall; the walk stops once recall is met.
    for reorder in {point.params.reorder for point in curve}:
        walk = [point for point in curve if point.params.reorder == reorder]
        assert [p.recall for p in walk] == sorted(p.recall for p in walk)
        assert all(p.recall < 0.95 for p in walk[:-1])


def test_choosing_a_point_prefers_both_targets_then_recall_then_the_most_accurate() -> None:
    from recsys_pipeline.index import OperatingPoint, SearchParams, choose_point

    def point(leaves: int, recall: float, qps: float, p99: float) -> OperatingPoint:
        return OperatingPoint(SearchParams(100, leaves, 200), recall, qps, p99 / 2, p99)

    config = IndexConfig(min_recall=0.95, max_p99_ms=5.0)
    slow, fast, short = point(50, 0.99, 100, 8.0), point(10, 0.96, 900, 2.0), point(2, 0.80, 5000, 0.5)
    assert choose_point([short, fast, slow], config) is fast
    assert choose_point([short, slow, point(80, 0.99, 50, 9.0)], config) is slow
    assert choose_point([short, point(4, 0.9, 3000, 1.0)], config).recall == 0.9


KINDS = ["scann_tree", "scann_brute_force", "exact"]


def build_kind(kind: str, item_idx: np.ndarray, items: np.ndarray) -> ItemIndex:
    if kind == "exact":
        return ExactIndex(item_idx, items)
    if kind == "scann_tree":
        params = SearchParams(num_leaves=max(2, int(np.sqrt(len(items)))), leaves_to_search=50, reorder=200)
    else:
        params = SearchParams(None, None, 200)
    return ScannIndex.build(item_idx, items, params, k=10)


class TestItemIndexContract:
    """What every ``ItemIndex`` backend promises; later stages never see which one they hold."""

    @pytest.fixture(params=KINDS)
    def kind(self, request) -> str:
        return request.param

    @pytest.fixture
    def catalogue(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items, queries = planted(3000)
        return np.arange(len(items)) * 2 + 1, items, queries  # dense ids, not row numbers

    def test_answers_in_item_ids_best_first_with_their_scores(self, kind: str, catalogue) -> None:
        item_idx, items, queries = catalogue
        index = build_kind(kind, item_idx, items)
        found, scores = index.search(queries, 10)
        assert found.shape == scores.shape == (len(queries), 10)
        assert np.isin(found, item_idx).all()
        assert (np.diff(scores, axis=1) <= 1e-5).all()
        rows = (found - 1) // 2
        np.testing.assert_allclose(
            scores, np.einsum("qd,qkd->qk", queries, items[rows]), rtol=1e-2, atol=1e-2
        )
        recall = measure(index, item_idx, items, queries, 10)["index_recall_at_10"]
        assert recall >= (0.9 if kind == "scann_tree" else 1.0)

    def test_never_returns_more_items_than_it_holds(self, kind: str) -> None:
        items, queries = planted(60, n_queries=5)
        index = build_kind(kind, np.arange(60), items)
        found, _ = index.search(queries, 100)
        assert found.shape[1] <= 60 and all(len(set(row)) == len(row) for row in found.tolist())

    def test_round_trips_through_its_verified_folder(self, kind: str, catalogue, tmp_path: Path) -> None:
        item_idx, items, queries = catalogue
        index = build_kind(kind, item_idx, items)
        index.save(tmp_path / "index")
        loaded = load_index(tmp_path / "index")
        assert type(loaded) is type(index)
        np.testing.assert_array_equal(loaded.search(queries, 10)[0], index.search(queries, 10)[0])
        listed = sorted(p for p in (tmp_path / "index").iterdir() if p.name != "manifest.json")
        with listed[0].open("r+b") as handle:
            handle.seek(0)
            first = handle.read(1)
            handle.seek(0)
            handle.write(bytes([first[0] ^ 0xFF]))
        with pytest.raises(IndexIntegrityError, match="does not match its manifest"):
            load_index(tmp_path / "index")

    def test_upsert_and_delete_update_in_place_and_survive_a_reload(
        self, kind: str, catalogue, tmp_path: Path
    ) -> None:
        item_idx, items, queries = catalogue
        index = build_kind(kind, item_idx, items)
        rng = np.random.default_rng(1)
        probes = rng.normal(size=(5, items.shape[1])).astype(np.float32)
        # Long vectors along each probe: every probe's best match is its own upserted item.
        targets = 20 * probes / np.linalg.norm(probes, axis=1, keepdims=True)
        new_idx, new_vectors = np.array([7001, 7003, 7005]), targets[:3]
        moved_idx, moved_vectors = item_idx[[10, 20]], targets[3:]
        index.upsert(np.concatenate([new_idx, moved_idx]), np.vstack([new_vectors, moved_vectors]))
        index.delete(item_idx[[30, 40]])
        assert len(index.item_idx) == len(items) + 3 - 2
        assert not np.isin(item_idx[[30, 40]], index.item_idx).any()
        found, _ = index.search(probes, 10)
        np.testing.assert_array_equal(found[:, 0], [7001, 7003, 7005, item_idx[10], item_idx[20]])
        index.save(tmp_path / "index")
        reloaded = load_index(tmp_path / "index")
        np.testing.assert_array_equal(np.sort(reloaded.item_idx), np.sort(index.item_idx))
        np.testing.assert_array_equal(reloaded.search(probes, 10)[0][:, 0], found[:, 0])
        current = items.copy()
        current[[10, 20]] = moved_vectors
        keep = ~np.isin(item_idx, item_idx[[30, 40]])
        truth_idx = np.concatenate([item_idx[keep], new_idx])
        truth_vectors = np.vstack([current[keep], new_vectors])
        recall = measure(reloaded, truth_idx, truth_vectors, queries[rng.permutation(len(queries))], 10)
        assert recall["index_recall_at_10"] >= (0.9 if kind == "scann_tree" else 1.0)


def _parent(items: np.ndarray, users: np.ndarray, params: SearchParams) -> tuple[Embeddings, ScannIndex]:
    parent = Embeddings(np.arange(len(users)), users, np.arange(len(items)), items)
    return parent, ScannIndex.build(parent.item_idx, items, params, k=10)


def test_index_update_upserts_new_and_changed_items_in_place() -> None:
    items, queries = planted(3000)
    parent, index = _parent(items, queries, SearchParams(None, None, 200))
    changed = items.copy()
    changed[:5] *= -1
    new_items = planted(40, seed=3)[0]
    refreshed = Embeddings(
        parent.user_idx, parent.user_factors, np.arange(3040), np.vstack([changed, new_items])
    )
    config = IndexConfig()
    updated, metrics = update(index, parent, refreshed, recall_queries(refreshed, 1000), config, 10)
    assert updated is index, "a good enough update keeps the parent's index object"
    assert metrics["index_upserted"] == 45 and metrics["index_deleted"] == 0
    assert metrics["index_rebuilt"] == 0 and metrics["index_recall_at_10"] == 1.0
    assert len(updated.item_idx) == 3040


def test_index_update_rebuilds_when_the_updated_index_misses_the_recall_gate() -> None:
    items, queries = planted(3000)
    starved = SearchParams(num_leaves=50, leaves_to_search=1, reorder=10)  # a parent index tuned too tight
    parent, index = _parent(items, queries, starved)
    config = IndexConfig(brute_force_below=1000, min_recall=0.95)
    rebuilt, metrics = update(index, parent, parent, recall_queries(parent, 1000), config, 10)
    assert metrics["index_rebuilt"] == 1 and metrics["index_recall_at_10"] >= 0.95
    assert rebuilt is not index
