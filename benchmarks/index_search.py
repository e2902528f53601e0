"""ScaNN against exact search (batched matrix product) on synthetic item embeddings.

Items and queries share a latent cluster structure, like ALS factors of a catalogue with
genres: the index is built with the pipeline's own size-derived configuration and tuning.
Results per item count: ``recall_at_10``, ``qps`` (ScaNN), ``exact_qps``, ``speedup``, ``build_s``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recsys_pipeline.config import IndexConfig
from recsys_pipeline.index import build_tuned

PARAMS: dict[str, Any] = {
    "item_counts": [100_000, 1_000_000],
    "dims": 64,
    "queries": 1000,
    "k": 10,
    "seed": 0,
}


def synthetic_embeddings(n_items: int, dims: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, n_items // 1000), dims)).astype(np.float32)
    items = centres[rng.integers(0, len(centres), n_items)] + 0.5 * rng.normal(size=(n_items, dims)).astype(
        np.float32
    )
    queries = centres[rng.integers(0, len(centres), n_queries)] + 0.5 * rng.normal(size=(n_queries, dims))
    return items.astype(np.float32), queries.astype(np.float32)


def run(params: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    k = params["k"]
    for n_items in params["item_counts"]:
        items, queries = synthetic_embeddings(n_items, params["dims"], params["queries"], params["seed"])
        _, metrics, _ = build_tuned(np.arange(n_items), items, queries, IndexConfig(), k)
        results[str(n_items)] = {
            "recall_at_10": metrics[f"index_recall_at_{k}"],
            "qps": metrics["index_qps"],
            "exact_qps": metrics["exact_qps"],
            "speedup": metrics["index_qps"] / metrics["exact_qps"],
            "build_s": metrics["index_build_s"],
        }
        print(f"  {n_items:>9} items: {results[str(n_items)]}", flush=True)
    return results
