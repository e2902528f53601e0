"""Content embeddings: the map, the encoders' refusals, cold items in the index and in the run."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_pipeline.config import ContentMapConfig, ContentSourceConfig, IndexConfig, load_config
from recsys_pipeline.content import (
    ContentError,
    encode_items,
    fit_content_map,
    read_metadata,
    with_content_vectors,
)
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.index import ScannIndex, search_params
from recsys_pipeline.pipelines import WEEKLY
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.content import run_content, run_item_ingest
from tests.conftest import another_run_of

GENRES = 19


def test_the_map_recovers_a_planted_linear_relation() -> None:
    rng = np.random.default_rng(3)
    content = rng.normal(size=(600, 12))
    planted = rng.normal(size=(12, 6))
    factors = content @ planted + 0.5 + rng.normal(scale=0.05, size=(600, 6))
    fitted = fit_content_map(content, factors, ContentMapConfig())
    assert fitted.r2 > 0.99 and fitted.cosine > 0.99
    assert np.allclose(fitted.weights, planted, atol=0.02)
    fresh = rng.normal(size=(50, 12))
    assert np.allclose(fitted.apply(fresh), fresh @ planted + 0.5, atol=0.05)


def test_the_map_has_no_fit_where_content_says_nothing() -> None:
    rng = np.random.default_rng(4)
    fitted = fit_content_map(rng.normal(size=(400, 8)), rng.normal(size=(400, 4)), ContentMapConfig())
    assert fitted.r2 < 0.05


def _precomputed(tmp_path: Path, vectors: list[list[float]], dim: int):
    path = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"item_id": [str(n) for n in range(len(vectors))], "vector": vectors}), path)
    return load_config(
        overrides={
            "content.encoder": "precomputed",
            "content.dim": dim,
            "content.precomputed": {"path": str(path)},
        }
    ).content


def _items(count: int) -> pa.Table:
    return pa.table({"item_id": [str(n) for n in range(count)], "title": ["x"] * count})


def test_precomputed_vectors_of_the_wrong_width_are_refused(tmp_path) -> None:
    config = _precomputed(tmp_path, [[0.1, 0.2, 0.3]] * 4, dim=4)
    with pytest.raises(
        ContentError, match=r"4 of 4 vectors do not have content.dim=4 values \(the first has 3\)"
    ):
        encode_items(_items(4), config)


def test_precomputed_vectors_holding_nan_are_refused(tmp_path) -> None:
    config = _precomputed(tmp_path, [[0.1, 0.2], [float("nan"), 0.0], [0.3, 0.4]], dim=2)
    with pytest.raises(ContentError, match="1 vectors hold NaN or infinite values"):
        encode_items(_items(3), config)


def test_precomputed_vectors_must_cover_the_metadata(tmp_path) -> None:
    config = _precomputed(tmp_path, [[0.1, 0.2]] * 2, dim=2)
    with pytest.raises(ContentError, match="vectors for 50.0% of the metadata's items"):
        encode_items(_items(4), config)
    rows, vectors = encode_items(_items(2), config)
    assert rows.tolist() == [0, 1] and vectors.shape == (2, 2)


def test_metadata_rows_without_an_id_repeating_one_or_with_a_bad_number_are_quarantined(tmp_path) -> None:
    path = tmp_path / "items.csv"
    path.write_text(
        "id,title,year\n1,Alpha,1990\n,No id,1991\n1,Alpha again,1992\n2,Beta,soon\n3,Gamma,\n4,a,b,c\n"
        "007,Bond,\n"
    )
    config = load_config(
        overrides={
            "content.source": {
                "path": str(path),
                "id_column": "id",
                "text_columns": ["title"],
                "numeric_columns": ["year"],
            }
        }
    ).content
    assert config.source is not None
    read = read_metadata(config.source)
    assert read.items.column("item_id").to_pylist() == ["1", "3", "007"]  # ids stay text
    reasons = sorted(read.quarantine.column("reason").to_pylist())
    assert reasons == ["duplicate_item_id", "invalid_numeric", "missing_item_id", "unparseable_record"]
    assert (
        read.metrics["items_read"] == 7 == read.metrics["items_ingested"] + read.metrics["items_quarantined"]
    )


def _genres(items: pa.Table) -> np.ndarray:
    names = load_config().content.source.numeric_columns  # type: ignore[union-attr]
    return np.column_stack([np.asarray(items.column(name).to_pylist(), dtype=int) for name in names]) > 0


def test_cold_items_of_the_sample_find_neighbours_of_their_own_genres(movielens) -> None:
    """Items with too few ratings to learn from, placed by their title and genres alone, have learned
    neighbours (by cosine, as ``similar`` ranks) that share their genres far more often than chance."""
    from implicit.cpu.als import AlternatingLeastSquares

    config = load_config().content
    items = read_metadata(config.source).items  # type: ignore[arg-type]
    idx = np.asarray(items.column("item_id").to_pylist(), dtype=int) - 1
    counts = np.asarray(movielens.getnnz(axis=0)).ravel()
    warm_mask = counts >= 20
    model = AlternatingLeastSquares(factors=32, iterations=15, random_state=0)
    model.fit(movielens.multiply(warm_mask).tocsr(), show_progress=False)
    warm = np.flatnonzero(warm_mask)
    learned = Embeddings(
        np.arange(movielens.shape[0]), model.user_factors, warm, np.asarray(model.item_factors)[warm]
    )
    rows, vectors = encode_items(items, config)
    content_idx = idx[rows]
    assert np.array_equal(content_idx, np.arange(movielens.shape[1]))  # every item, in id order
    fitted = fit_content_map(vectors[warm], learned.item_factors, config.map)
    served = with_content_vectors(learned, content_idx, fitted.apply(vectors), counts, None)
    assert fitted.r2 > 0 and np.array_equal(served.cold_item_idx, np.flatnonzero(~warm_mask))

    genres = _genres(items)
    unit = served.item_factors / np.linalg.norm(served.item_factors, axis=1, keepdims=True)
    position = {item: row for row, item in enumerate(served.item_idx)}
    warm_rows = np.array([position[item] for item in warm])
    shared, chance = [], []
    for cold in served.cold_item_idx[:200]:
        scores = unit[warm_rows] @ unit[position[cold]]
        neighbours = warm[np.argsort(-scores)[:10]]
        shared.append((genres[neighbours] & genres[cold]).any(axis=1).mean())
        chance.append((genres[warm] & genres[cold]).any(axis=1).mean())
    assert np.mean(shared) > np.mean(chance) + 0.15


def test_a_cold_item_is_found_through_the_scann_index() -> None:
    rng = np.random.default_rng(5)
    learned = Embeddings(
        np.arange(10), rng.normal(size=(10, 16)), np.arange(3000), rng.normal(size=(3000, 16))
    )
    cold_vectors = rng.normal(size=(5, 16)) * 3
    served = with_content_vectors(learned, np.arange(3000, 3005), cold_vectors, np.zeros(3005), None)
    # Every leaf searched: the test is whether the cold vectors are in the index, not its recall.
    config = IndexConfig(brute_force_below=0, num_leaves=10, leaves_to_search=10)
    index = ScannIndex.build(
        served.item_idx, served.item_factors, search_params(len(served.item_idx), config), 10
    )
    found, _ = index.search(cold_vectors.astype(np.float32), 10)
    assert all(3000 + row in found[row] for row in range(5))
    assert served.cold_item_idx.tolist() == [3000, 3001, 3002, 3003, 3004]


def test_the_content_stage_makes_no_network_connection(own_weekly_run: RunContext, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    run_item_ingest(own_weekly_run)
    metrics = run_content(own_weekly_run)
    assert metrics["cold_items"] > 0 and metrics["content_map_r2"] > 0
    served = own_weekly_run.artifacts.served.embeddings()
    assert len(served.cold_item_idx) == metrics["cold_items"]
    assert np.isin(served.cold_item_idx, served.item_idx).all()
    n_users, n_items = own_weekly_run.artifacts.interactions.matrix_shape()
    assert metrics["content_coverage"] == pytest.approx(1.0) and n_items == 1682


def test_a_sentence_model_folder_whose_hash_differs_is_refused_before_it_is_loaded(tmp_path) -> None:
    from recsys_pipeline.cli import main
    from recsys_pipeline.content import folder_sha256

    model = tmp_path / "model"
    (model / "pooling").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "pooling" / "config.json").write_text('{"dim": 8}')
    expected = folder_sha256(model)
    assert main(["content-hash", str(model)]) == 0
    config = load_config(
        overrides={
            "content.encoder": "sentence",
            "content.sentence": {"model_dir": str(model), "sha256": expected},
        }
    ).content
    (model / "pooling" / "config.json").write_text('{"dim": 9}')
    assert folder_sha256(model) != expected
    with pytest.raises(ContentError, match="hashes to .*, not content.sentence.sha256"):
        encode_items(_items(3), config)


def test_metadata_naming_too_few_of_the_events_items_fails_at_ingest_items(
    own_weekly_run: RunContext, tmp_path: Path
) -> None:
    """A user's own events with metadata that does not describe them: the run fails as soon as the
    events are in the lake, not after training (ingest_items runs before train in the declared
    weekly, and reads the lake)."""
    few = tmp_path / "items.csv"
    few.write_text("item,title\n1,Toy Story (1995)\n2,GoldenEye (1995)\n3,Four Rooms (1995)\n")
    content = own_weekly_run.config.content.model_copy(
        update={"source": ContentSourceConfig(path=few, id_column="item", text_columns=["title"])}
    )
    run = another_run_of(
        own_weekly_run, "manual__few_items", own_weekly_run.config.model_copy(update={"content": content})
    )
    items_before = (run.layout.items_lake / "items.parquet").read_bytes()
    with pytest.raises(ContentError, match=r"describes 3 of the catalogue's 1682 items, below content\.min"):
        run_item_ingest(run)
    assert (run.layout.items_lake / "items.parquet").read_bytes() == items_before
    # The full metadata passes the same check.
    assert run_item_ingest(own_weekly_run)["items_ingested"] == 1682
    names = [stage.name for stage in WEEKLY.stages]
    assert names.index("ingest_items") < names.index("train")
    assert "ingest_events" in WEEKLY.upstream("ingest_items")
