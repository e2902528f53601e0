"""A published model holds no pickle and is loaded only after every file matches the manifest whose
hash the registry holds (issue #14, item 8); that manifest is of the files written, never of what
the store returned (issue #31, item 8)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_pipeline import tracking
from recsys_pipeline.bundle import (
    MODEL_MANIFEST,
    BundleIntegrityError,
    is_pickle,
    manifest_bytes,
    tree_manifest,
    verify_tree,
)
from recsys_pipeline.index import ExactIndex, IndexIntegrityError, ScannIndex, SearchParams, load_index
from recsys_pipeline.registry import Registry
from recsys_pipeline.serving import Recommender, verified_pyfunc
from recsys_pipeline.stages.publish import run_promotion, run_publish


@pytest.fixture
def published(own_weekly_run):
    version = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, version)
    return own_weekly_run.config, version


def stored_model_dir(config, version: str) -> Path:
    """Where the embedded store keeps the registered model's files (what a hostile writer would edit)."""
    uri = tracking.client(config).get_model_version_download_uri(config.mlflow.model_name, version)
    return Path(unquote(urlparse(uri).path))


def swap_first_two_rows(path: Path) -> None:
    table = pq.read_table(path)
    order = np.arange(table.num_rows)
    order[[0, 1]] = order[[1, 0]]
    swapped = table.take(pa.array(order))
    pq.write_table(pa.table({"id": swapped.column("id"), "idx": table.column("idx")}), path)


def test_nothing_in_a_published_model_is_a_pickle(published) -> None:
    config, version = published
    model = Registry(config).verified_model(version)
    files = [p for p in model.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix == ".pkl" or is_pickle(p)]
    assert "python_model.pkl" not in (model / "MLmodel").read_text()
    assert (model / "artifacts" / "bundle" / "index" / "docids.npy").is_file()


def test_a_file_changed_in_the_store_after_upload_is_never_registered(own_weekly_run, monkeypatch) -> None:
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    upload = LocalArtifactRepository.log_artifacts

    def upload_then_change_in_the_store(self, local_dir, artifact_path=None) -> None:
        upload(self, local_dir, artifact_path)
        stored = Path(self.artifact_dir) / (artifact_path or "")
        for popularity in stored.rglob("popularity.npy"):  # the bundle's: a store changing it on the way
            popularity.write_bytes(popularity.read_bytes()[:-8] + bytes(8))

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", upload_then_change_in_the_store)
    with pytest.raises(BundleIntegrityError, match="popularity.npy"):
        run_publish(own_weekly_run)
    config = own_weekly_run.config
    assert tracking.client(config).search_model_versions(f"name='{config.mlflow.model_name}'") == []


def test_a_tampered_cache_is_downloaded_again_once(published) -> None:
    config, version = published
    first = Recommender.from_registry(config=config)
    user = first.user_ids[0]
    expected = first.recommend(user, 10)
    cached = Registry(config).verified_model(version) / "artifacts" / "bundle" / "id_maps" / "users.parquet"
    swap_first_two_rows(cached)
    again = Recommender.from_registry(config=config)
    assert again.recommend(user, 10).equals(expected)
    assert pq.read_table(cached).column("id")[0].as_py() == user  # the cache holds the good copy again


def test_a_tampered_stored_model_is_refused(published) -> None:
    config, version = published
    stored = stored_model_dir(config, version)
    swap_first_two_rows(stored / "artifacts" / "bundle" / "id_maps" / "users.parquet")
    shutil.rmtree(config.state_home / "cache", ignore_errors=True)
    with pytest.raises(BundleIntegrityError, match="users.parquet does not match its manifest hash"):
        Recommender.from_registry(config=config)


def test_a_pickle_planted_in_the_stored_model_is_refused_even_with_a_matching_manifest(published) -> None:
    config, version = published
    stored = stored_model_dir(config, version)
    (stored / "python_model.pkl").write_bytes(pickle.dumps({"payload": "runs on load"}))
    shutil.rmtree(config.state_home / "cache", ignore_errors=True)
    with pytest.raises(BundleIntegrityError, match="files not in the manifest: \\['python_model.pkl'\\]"):
        Registry(config).verified_model(version)
    # The attacker also rewrites the manifest logged beside the model to list the pickle; the
    # registry's tag still holds the hash of the original one.
    client = tracking.client(config)
    run = client.get_run(client.get_model_version(config.mlflow.model_name, version).run_id)
    stored_manifest = Path(unquote(urlparse(run.info.artifact_uri).path)) / MODEL_MANIFEST
    manifest = json.loads(stored_manifest.read_text())["files"]
    manifest["python_model.pkl"] = hashlib.sha256((stored / "python_model.pkl").read_bytes()).hexdigest()
    stored_manifest.write_bytes(manifest_bytes(manifest))
    shutil.rmtree(config.state_home / "cache", ignore_errors=True)
    with pytest.raises(BundleIntegrityError, match="does not match the hash the registry holds"):
        Registry(config).verified_model(version)


def test_the_verified_loader_checks_every_file_before_mlflow_imports_the_stored_code(
    published, tmp_path: Path
) -> None:
    config, version = published
    model = verified_pyfunc(config=config)
    answer = model.predict(pd.DataFrame({"user_id": ["196"], "k": [3]}))
    assert list(answer["rank"]) == [1, 2, 3]
    # Stored code that would run on import: refused before MLflow imports it.
    ran = tmp_path / "stored code ran"
    entry = stored_model_dir(config, version) / "pyfunc_entry.py"
    entry.write_text(entry.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")
    shutil.rmtree(config.state_home / "cache", ignore_errors=True)
    with pytest.raises(BundleIntegrityError, match="pyfunc_entry.py does not match its manifest hash"):
        verified_pyfunc(config=config)
    assert not ran.exists()


def test_the_pyfunc_checks_its_bundle_files_when_loaded_without_the_registry(published) -> None:
    import mlflow

    config, version = published
    stored = stored_model_dir(config, version)
    popularity = stored / "artifacts" / "bundle" / "popularity.npy"
    popularity.write_bytes(popularity.read_bytes()[:-8] + bytes(8))
    with pytest.raises(
        BundleIntegrityError, match="bundle files differ from those published: popularity.npy"
    ):
        mlflow.pyfunc.load_model(str(stored))


def test_manifest_names_must_stay_inside_the_model(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.json").write_text("{}")
    for name in ("../outside.json", "/etc/passwd", "a\\..\\b"):
        manifest = {**tree_manifest(tmp_path / "model"), name: "0" * 64}
        (tmp_path / MODEL_MANIFEST).write_bytes(manifest_bytes(manifest))
        digest = hashlib.sha256(manifest_bytes(manifest)).hexdigest()
        with pytest.raises(BundleIntegrityError, match="paths outside the model"):
            verify_tree(tmp_path / "model", tmp_path / MODEL_MANIFEST, digest)


def test_an_index_folder_holding_a_pickle_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(200, 8)).astype(np.float32)
    ScannIndex.build(np.arange(200), items, SearchParams(None, None, 50), k=10).save(tmp_path / "scann")
    assert not list((tmp_path / "scann").glob("*.pkl"))
    assert load_index(tmp_path / "scann").search(items[:2], 3)[0].shape == (2, 3)
    (tmp_path / "scann" / "scann_docids.pkl").write_bytes(pickle.dumps([str(i) for i in range(200)]))
    with pytest.raises(IndexIntegrityError, match="holds a pickle"):
        load_index(tmp_path / "scann")
    ExactIndex(np.arange(200), items).save(tmp_path / "exact")
    assert not any(is_pickle(p) for p in (tmp_path / "exact").iterdir())
