"""The published bundle: its format version, its writer, and its reader (which checks the format).

Layout (the ``bundle`` artifact of a registered pyfunc model)::

    bundle.json                  format version, model name, data window, creation time
    embeddings/                  {user,item}_factors.parquet, training_loss.json, params.json
    id_maps/{users,items}.parquet   (id STRING, idx INT)
    history.parquet              (user_idx, item_idx) training interactions, to exclude seen items
    popularity.npy               training interactions per item, for the popular-items fallback
    recommendations.parquet      precomputed top-N for active users (user_id, rank, item_id, score)
    index/                       the item index with its manifest.json
    metrics.json, gates.json, lineage.json
    validation/                  GX suites, results and Data Docs
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_pipeline.config import AlsConfig
from recsys_pipeline.embeddings import Embeddings, read_embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.index import ItemIndex, load_index
from recsys_pipeline.runs import SIDES, RunContext, atomic_dir, now_utc, read_trained_params, write_json
from recsys_pipeline.tables import read_id_map

BUNDLE_FORMAT = 1
SUPPORTED_FORMATS = frozenset({BUNDLE_FORMAT})
META = "bundle.json"


class BundleFormatError(RecsysError):
    """The bundle was written in a format this code does not read."""


def write_bundle(run: RunContext, lineage: dict[str, Any]) -> Path:
    """Assemble the run's outputs into one folder a service can load on its own (``run.bundle_dir``)."""
    with atomic_dir(run.bundle_dir) as staging:
        shutil.copytree(run.model_dir, staging / "embeddings")
        shutil.copytree(run.index_dir, staging / "index")
        shutil.copytree(run.validation_dir, staging / "validation")
        (staging / "id_maps").mkdir()
        for side in SIDES:
            (part,) = sorted(run.id_map_dir(side).glob("*.parquet"))
            shutil.copy(part, staging / "id_maps" / f"{side}.parquet")
        train = run.train_triples()
        pq.write_table(
            pa.table(
                {"user_idx": train.user_idx.astype(np.int32), "item_idx": train.item_idx.astype(np.int32)}
            ),
            staging / "history.parquet",
        )
        n_items = pq.ParquetFile(staging / "id_maps" / "items.parquet").metadata.num_rows
        np.save(staging / "popularity.npy", np.bincount(train.item_idx, minlength=n_items))
        if run.recommendations_file.is_file():
            shutil.copy(run.recommendations_file, staging / "recommendations.parquet")
        write_json(staging / "metrics.json", run.read_metrics())
        write_json(staging / "gates.json", run.read_gates())
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
    return run.bundle_dir


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

    def embeddings(self) -> Embeddings:
        return read_embeddings(self.path / "embeddings")

    def trained_params(self, fallback: AlsConfig) -> AlsConfig:
        return read_trained_params(self.path / "embeddings", fallback)

    def ids(self, side: str) -> np.ndarray:
        return read_id_map(self.path / "id_maps" / f"{side}.parquet")

    def index(self) -> ItemIndex:
        return load_index(self.path / "index")

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_idx, item_idx) of the training interactions."""
        table = pq.read_table(self.path / "history.parquet")
        return table.column("user_idx").to_numpy(), table.column("item_idx").to_numpy()

    def popularity(self) -> np.ndarray:
        return np.load(self.path / "popularity.npy")
