"""Nightly fold-in against a full retrain, on a synthetic log where 1% of the events are new.

The events are ordered by time: the first 98% train the parent (the weekly model), the next
1% are the new day, the last 1% are the holdout both models are scored on. The full
retrain trains from scratch on the first 99%; the refresh folds the new day's users (from
their whole history) and new items into the parent with implicit's least-squares updates.
Results: ``refresh_s``, ``full_s``, ``ndcg_refresh``, ``ndcg_full`` (nDCG@10 on the same
holdout, training items excluded), ``speedup`` (full / refresh), ``ndcg_ratio``, and
``ndcg_popularity`` (the most-popular list on that holdout, for scale).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.als import extended_item_weights, item_weights, train
from recsys_pipeline.config import AlsConfig, RefreshConfig
from recsys_pipeline.evaluate import EvaluationSet
from recsys_pipeline.refresh import fold_in, rows_to_refresh
from recsys_pipeline.synthetic import SyntheticSpec, sample_events
from recsys_pipeline.tables import Triples

# About 100 events per user, so there is taste to learn beyond popularity (with ~20 per user the
# generator's next events are best predicted by the most-popular list and both models just echo it).
PARAMS: dict[str, Any] = {
    "events": 2_000_000,
    "users": 20_000,
    "items": 10_000,
    "days": 28,
    "new_share": 0.01,
    "holdout_share": 0.01,
    "als": {"factors": 16, "regularization": 100.0, "alpha": 5.0, "iterations": 15, "use_cg": True},
    "k": 10,
}


def counts(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    return Triples(users, items, np.ones(len(users), np.float32)).to_csr(*shape)


def run(params: dict[str, Any]) -> dict[str, Any]:
    spec = SyntheticSpec(
        events=params["events"], users=params["users"], items=params["items"], days=params["days"]
    )
    chunks = list(sample_events(spec))
    users = np.concatenate([c.users for c in chunks])
    items = np.concatenate([c.items for c in chunks])
    order = np.argsort(np.concatenate([c.ts for c in chunks]), kind="stable")
    users, items = users[order], items[order]
    parent_end = int(len(order) * (1 - params["new_share"] - params["holdout_share"]))
    new_end = int(len(order) * (1 - params["holdout_share"]))
    shape = (spec.users, spec.items)
    before = counts(users[:parent_end], items[:parent_end], shape)
    current = counts(users[:new_end], items[:new_end], shape)
    holdout = counts(users[new_end:], items[new_end:], shape)
    als = AlsConfig(**params["als"])
    parent, _ = train(before, als)

    started = time.perf_counter()
    full, _ = train(current, als)
    full_s = time.perf_counter() - started

    started = time.perf_counter()
    changed, new_items = rows_to_refresh(current, parent, np.unique(users[parent_end:new_end]))
    weights = extended_item_weights(item_weights(before, als), parent.item_idx, current, als)
    refreshed = fold_in(parent, current, changed, new_items, als, RefreshConfig(), weights)
    refresh_s = time.perf_counter() - started

    evaluation = EvaluationSet.build(current, holdout)
    k = params["k"]
    ndcg_full = evaluation.evaluate(full, k)[f"ndcg_at_{k}"]
    ndcg_refresh = evaluation.evaluate(refreshed, k)[f"ndcg_at_{k}"]
    results = {
        "refresh_s": refresh_s,
        "full_s": full_s,
        "ndcg_refresh": ndcg_refresh,
        "ndcg_full": ndcg_full,
        "ndcg_popularity": evaluation.evaluate_popularity(k)[f"baseline_ndcg_at_{k}"],
        "speedup": full_s / refresh_s,
        "ndcg_ratio": ndcg_refresh / ndcg_full,
        "new_events": new_end - parent_end,
        "users_refreshed": len(changed),
        "items_added": len(new_items),
        "interactions": int(current.nnz),
    }
    print(
        f"  refresh {refresh_s:.2f}s vs full retrain {full_s:.2f}s ({results['speedup']:.1f}x); "
        f"nDCG@{k} {ndcg_refresh:.4f} vs {ndcg_full:.4f} ({results['ndcg_ratio']:.1%})",
        flush=True,
    )
    return results
