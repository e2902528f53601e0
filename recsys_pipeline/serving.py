"""Load a published bundle and answer recommendation and similar-item queries.

Output rows carry ``rank`` (1 = best), ``item_id`` and ``score`` plus the query key
(``user_id`` for recommendations, ``query_item_id`` for similar items), in the
dataset's original IDs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
from mlflow.pyfunc import PythonModel

from recsys_pipeline.als import read_embeddings
from recsys_pipeline.config import PipelineConfig, load_config
from recsys_pipeline.evaluate import first_unseen, popular_items
from recsys_pipeline.index import load_index
from recsys_pipeline.tables import read_id_map

SUPPORTED_BUNDLE_FORMATS = {1}
RESULT_COLUMNS = ["rank", "item_id", "score"]


class UnknownIdError(KeyError):
    """An id the published version has never seen."""

    def __str__(self) -> str:
        return str(self.args[0])


class BundleFormatError(RuntimeError):
    """The bundle was written in a format this code does not read."""


class Recommender:
    """In-process access to one published version; loads maps, vectors and index once."""

    def __init__(self, bundle_dir: Path):
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        if meta.get("format_version") not in SUPPORTED_BUNDLE_FORMATS:
            raise BundleFormatError(
                f"bundle format {meta.get('format_version')} is not supported (supported: "
                f"{sorted(SUPPORTED_BUNDLE_FORMATS)}); upgrade recsys-pipeline"
            )
        self.meta = meta
        self.user_ids = read_id_map(bundle_dir / "id_maps" / "users.parquet")
        self.item_ids = read_id_map(bundle_dir / "id_maps" / "items.parquet")
        self.user_lookup = {user_id: idx for idx, user_id in enumerate(self.user_ids)}
        self.item_lookup = {item_id: idx for idx, item_id in enumerate(self.item_ids)}
        embeddings = read_embeddings(bundle_dir / "embeddings")
        self.user_vectors = embeddings.dense_users(len(self.user_ids))
        self.has_user_vector = np.zeros(len(self.user_ids), dtype=bool)
        self.has_user_vector[embeddings.user_idx] = True
        self.item_vectors = embeddings.dense_items(len(self.item_ids))
        self.has_item_vector = np.zeros(len(self.item_ids), dtype=bool)
        self.has_item_vector[embeddings.item_idx] = True
        self.index = load_index(bundle_dir / "index")
        history = pq.read_table(bundle_dir / "history.parquet")
        self.history = sp.csr_matrix(
            (
                np.ones(history.num_rows, dtype=np.int8),
                (history.column("user_idx").to_numpy(), history.column("item_idx").to_numpy()),
            ),
            shape=(len(self.user_ids), len(self.item_ids)),
        )
        popularity = np.load(bundle_dir / "popularity.npy")
        self.popular = popular_items(popularity)
        self.popularity = popularity

    @classmethod
    def from_registry(cls, alias: str = "champion", config: PipelineConfig | None = None) -> Recommender:
        from recsys_pipeline.publish import download_bundle

        _, bundle = download_bundle(config or load_config(), alias)
        return cls(bundle)

    def _user_idx(self, user_id: str) -> int | None:
        return self.user_lookup.get(str(user_id))

    def recommend(self, user_id: str, k: int = 10, unknown: str = "error") -> pd.DataFrame:
        """Top-k unseen items for a user.

        A user without a vector (new, or no training data) gets the most popular unseen
        items. A user id never seen raises :class:`UnknownIdError` unless ``unknown="popular"``.
        """
        idx = self._user_idx(user_id)
        if idx is None and unknown == "error":
            raise UnknownIdError(f"unknown user id {user_id!r}: not in this version's ID map")
        seen = self.history[idx].indices if idx is not None else np.empty(0, dtype=np.int64)
        if idx is None or not self.has_user_vector[idx]:
            ranked, ranked_scores = self.popular, self.popularity[self.popular].astype(np.float32)
        else:
            found, found_scores = self.index.search(self.user_vectors[idx][None, :], k + len(seen))
            ranked, ranked_scores = found[0], found_scores[0]
        items, scores = first_unseen(ranked, ranked_scores, seen, k)
        return pd.DataFrame(
            {
                "user_id": str(user_id),
                "rank": np.arange(1, len(items) + 1),
                "item_id": self.item_ids[items],
                "score": np.asarray(scores, dtype=np.float64),
            }
        )

    def similar(self, item_id: str, k: int = 10) -> pd.DataFrame:
        """The k items whose vectors have the highest cosine with the item's, itself excluded."""
        idx = self.item_lookup.get(str(item_id))
        if idx is None:
            raise UnknownIdError(f"unknown item id {item_id!r}: not in this version's ID map")
        if not self.has_item_vector[idx]:
            raise UnknownIdError(f"item id {item_id!r} has no vector in this version (no training data)")
        norms = np.linalg.norm(self.item_vectors, axis=1)
        cosine = self.item_vectors @ self.item_vectors[idx] / np.maximum(norms * norms[idx], 1e-12)
        cosine[~self.has_item_vector] = -np.inf
        cosine[idx] = -np.inf
        k = min(k, int(self.has_item_vector.sum()) - 1)
        best = np.argsort(-cosine, kind="stable")[:k]
        return pd.DataFrame(
            {
                "query_item_id": str(item_id),
                "rank": np.arange(1, len(best) + 1),
                "item_id": self.item_ids[best],
                "score": cosine[best].astype(np.float64),
            }
        )


def model_signature() -> Any:
    """Input: ``user_id`` (recommend) or ``item_id`` (similar) strings, optional ``k``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "user_id", required=False),
                ColSpec("string", "item_id", required=False),
                ColSpec("long", "k", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "user_id", required=False),
                ColSpec("string", "query_item_id", required=False),
                ColSpec("long", "rank"),
                ColSpec("string", "item_id"),
                ColSpec("double", "score"),
            ]
        ),
    )


class RecsysPyfunc(PythonModel):
    """The registered model: rows with ``user_id`` get recommendations, rows with ``item_id`` similar items.

    Unknown users get the most popular items (a service should always answer);
    unknown items raise an error.
    """

    def load_context(self, context: Any) -> None:
        self.recommender = Recommender(Path(context.artifacts["bundle"]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frames = []
        for row in model_input.to_dict(orient="records"):
            k = int(row["k"]) if pd.notna(row.get("k")) else 10
            if pd.notna(row.get("user_id")):
                frames.append(self.recommender.recommend(str(row["user_id"]), k, unknown="popular"))
            elif pd.notna(row.get("item_id")):
                frames.append(self.recommender.similar(str(row["item_id"]), k))
            else:
                raise ValueError("each input row needs a user_id or an item_id")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
