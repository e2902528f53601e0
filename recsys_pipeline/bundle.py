"""The published bundle: its format version, its writer, and its reader (which checks the format).

Layout (the ``bundle`` artifact of a registered pyfunc model)::

    bundle.json                  format version, model name, data window, creation time
    embeddings/                  {user,item}_factors.parquet, cold_items.parquet, training_loss, params,
                                 item_weights.npy (the confidence weighting's, if any)
    content/                     content_vectors.parquet, content_map.{parquet,json} (content enabled)
    id_maps/{users,items}.parquet   (id STRING, idx INT)
    history.parquet              (user_idx, item_idx) training interactions, to exclude seen items
    popularity.npy               training interactions per item, for the popular-items fallback
    recommendations.parquet      precomputed top-N for active users (user_id, rank, item_id, score)
    index/                       the item index with its manifest.json
    metrics.json, gates.json, lineage.json
    validation/                  GX suites, results and Data Docs
    files.json                   sha256 of every other file of the bundle, checked when the pyfunc loads

Nothing in it is a pickle. The registered model around it (MLmodel, the model's code, its
requirements and this folder) is covered file by file by one manifest (``MODEL_MANIFEST``, logged
beside the model), whose own sha256 the registry holds as the version's tag ``MANIFEST_TAG``:
:func:`verify_tree` checks a downloaded model against it before anything in it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_pipeline.artifacts import SERVED_MODEL, SIDES, ModelFiles
from recsys_pipeline.config import AlsConfig
from recsys_pipeline.embeddings import Embeddings, read_embeddings
from recsys_pipeline.erasure import Forgotten, Scrubbed, scrub_tree
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir, file_sha256, linked_copy, write_json
from recsys_pipeline.index import ItemIndex, load_index
from recsys_pipeline.runs import RunContext, now_utc
from recsys_pipeline.tables import read_id_map

# 2: no pickle anywhere (index docids as .npy, the pyfunc as code) and a registry-held manifest.
BUNDLE_FORMAT = 2
SUPPORTED_FORMATS = frozenset({BUNDLE_FORMAT})
META = "bundle.json"
BUNDLE_FILES = "files.json"
MODEL_MANIFEST = "model_manifest.json"
MANIFEST_TAG = "model_manifest_sha256"
# Written by MLflow's downloader itself (which registered name and version a copy came from): not
# part of what was published, so neither hashed nor refused.
DOWNLOAD_METADATA = frozenset({"registered_model_meta"})
# How pickles of protocol 2 to 5 begin (4 and 5 always open with a FRAME opcode, 0x95).
PICKLE_HEADERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04\x95", b"\x80\x05\x95")


class BundleFormatError(RecsysError):
    """The bundle was written in a format this code does not read."""


class BundleIntegrityError(RecsysError):
    """A published model's files differ from the manifest whose hash the registry holds."""


def tree_manifest(directory: Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file below ``directory``; refuses pickles."""
    manifest: dict[str, str] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name in DOWNLOAD_METADATA:
            continue
        if path.suffix in (".pkl", ".pickle") or is_pickle(path):
            raise BundleIntegrityError(f"{name} is a pickle: a published model must not hold one")
        manifest[name] = file_sha256(path)
    return manifest


def is_pickle(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(3)
    return any(head.startswith(header) for header in PICKLE_HEADERS)


def manifest_bytes(manifest: dict[str, str]) -> bytes:
    """The canonical serialisation whose sha256 the registry holds."""
    return json.dumps({"files": manifest}, indent=1, sort_keys=True).encode()


def manifest_sha256(manifest: dict[str, str]) -> str:
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def safe_name(name: str) -> bool:
    """A manifest entry is a plain relative path inside the model: no '..', no absolute path."""
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and not path.is_absolute() and ".." not in path.parts


def verify_tree(directory: Path, manifest_file: Path, expected_sha256: str) -> None:
    """Check a downloaded model against its manifest and the manifest against the registry's hash.

    Every listed file must be there with its hash, and nothing else may be: an added file (a pickle
    planted beside the model, say) fails as surely as a changed one.
    """
    raw = manifest_file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise BundleIntegrityError(f"{manifest_file.name} does not match the hash the registry holds")
    listed: dict[str, str] = json.loads(raw)["files"]
    unsafe = sorted(name for name in listed if not safe_name(name))
    if unsafe:
        raise BundleIntegrityError(f"the manifest names paths outside the model: {unsafe[:3]}")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    present -= DOWNLOAD_METADATA
    if present - set(listed):
        raise BundleIntegrityError(f"files not in the manifest: {sorted(present - set(listed))[:3]}")
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise BundleIntegrityError(f"{name} is listed in the manifest but missing")
        if file_sha256(path) != expected:
            raise BundleIntegrityError(f"{name} does not match its manifest hash")


def write_bundle(run: RunContext, lineage: dict[str, Any]) -> Path:
    """Assemble the run's outputs into one folder a service can load on its own (its ``bundle_dir``)."""
    with atomic_dir(run.artifacts.bundle_dir) as staging:
        link_tree = partial(shutil.copytree, copy_function=linked_copy)
        link_tree(run.artifacts.served.root, staging / "embeddings")
        if run.artifacts.content.root.is_dir():
            link_tree(
                run.artifacts.content.root, staging / "content", ignore=shutil.ignore_patterns(SERVED_MODEL)
            )
        link_tree(run.artifacts.index_dir, staging / "index")
        link_tree(run.artifacts.validation_dir, staging / "validation")
        (staging / "id_maps").mkdir()
        for side in SIDES:
            (part,) = sorted(run.artifacts.interactions.map_dir(side).glob("*.parquet"))
            linked_copy(part, staging / "id_maps" / f"{side}.parquet")
        train = run.artifacts.interactions.train_triples()
        pq.write_table(
            pa.table(
                {
                    "user_idx": train.user_idx.astype(np.int32, copy=False),
                    "item_idx": train.item_idx.astype(np.int32, copy=False),
                }
            ),
            staging / "history.parquet",
        )
        n_items = pq.ParquetFile(staging / "id_maps" / "items.parquet").metadata.num_rows
        np.save(staging / "popularity.npy", np.bincount(train.item_idx, minlength=n_items))
        if run.artifacts.recommendations_file.is_file():
            linked_copy(run.artifacts.recommendations_file, staging / "recommendations.parquet")
        write_json(staging / "metrics.json", run.artifacts.read_metrics())
        write_json(staging / "gates.json", run.artifacts.read_gates())
        write_json(staging / "lineage.json", lineage)
        write_json(
            staging / META,
            {
                "format_version": BUNDLE_FORMAT,
                "model_name": run.config.mlflow.model_name,
                "data_interval": [run.interval_start.isoformat(), run.interval_end.isoformat()],
                "created_at": now_utc().isoformat(),
            },
        )
        write_json(staging / BUNDLE_FILES, tree_manifest(staging))
    return run.artifacts.bundle_dir


def write_erased_bundle(
    source: Path, target: Path, forgotten: Forgotten, user_tombstones: pa.Array, erasure: dict[str, str]
) -> Scrubbed:
    """Write at ``target`` a copy of the bundle at ``source`` without the forgotten users: their ids
    tombstoned in the users' map, their vectors, training history and precomputed lists removed,
    and any mention in its reports replaced (see :func:`recsys_pipeline.erasure.scrub_tree`). Items,
    the index and the popularity counts stay as they are. ``erasure`` (the request and the parent
    version) is added to its lineage; ``files.json`` is written anew."""
    with atomic_dir(target) as staging:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(BUNDLE_FILES, *DOWNLOAD_METADATA))
        scrubbed = scrub_tree(staging, forgotten, user_tombstones)
        lineage = json.loads((staging / "lineage.json").read_text())
        write_json(staging / "lineage.json", {**lineage, "erasure": erasure})
        meta = json.loads((staging / META).read_text())
        write_json(staging / META, {**meta, "created_at": now_utc().isoformat()})
        write_json(staging / BUNDLE_FILES, tree_manifest(staging))
    return scrubbed


class Bundle:
    """A bundle folder whose format this code reads; each accessor reads one part of it."""

    def __init__(self, path: Path):
        meta_path = path / META
        if not meta_path.is_file():
            raise BundleFormatError(f"{path} is not a bundle: it has no {META}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in SUPPORTED_FORMATS:
            raise BundleFormatError(
                f"bundle format {meta.get('format_version')} is not supported (supported: "
                f"{sorted(SUPPORTED_FORMATS)}); upgrade recsys-pipeline or republish the version"
            )
        self.path = path
        self.meta = meta

    def check_files(self) -> None:
        """Every file as the bundle was written (``files.json``), none missing, none added: what a
        pyfunc loaded straight from the store checks itself (a registry-verified copy already was)."""
        listing = self.path / BUNDLE_FILES
        if not listing.is_file():
            raise BundleIntegrityError(f"{self.path} has no {BUNDLE_FILES}: republish the version")
        expected: dict[str, str] = json.loads(listing.read_text())
        found = tree_manifest(self.path)
        found.pop(BUNDLE_FILES)
        differing = sorted(
            name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name)
        )
        if differing:
            raise BundleIntegrityError(
                f"bundle files differ from those published: {', '.join(differing[:3])}; refusing to load it"
            )

    def embeddings(self) -> Embeddings:
        return read_embeddings(self.path / "embeddings")

    def trained_params(self, fallback: AlsConfig) -> AlsConfig:
        return ModelFiles(self.path / "embeddings", fallback).trained_params()

    def item_weights(self) -> np.ndarray | None:
        return ModelFiles(self.path / "embeddings", AlsConfig()).item_weights()

    def sweep_summary(self) -> dict[str, Any] | None:
        """The sweep that chose the model's settings (a nightly carries its weekly parent's)."""
        return ModelFiles(self.path / "embeddings", AlsConfig()).sweep_summary()

    def ids(self, side: str) -> np.ndarray:
        return read_id_map(self.path / "id_maps" / f"{side}.parquet")

    def index(self) -> ItemIndex:
        return load_index(self.path / "index")

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_idx, item_idx) of the training interactions."""
        table = pq.read_table(self.path / "history.parquet")
        return table.column("user_idx").to_numpy(), table.column("item_idx").to_numpy()

    @property
    def recommendations_file(self) -> Path:
        return self.path / "recommendations.parquet"

    def popularity(self) -> np.ndarray:
        return np.load(self.path / "popularity.npy")
