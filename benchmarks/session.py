"""Recommendations from a session, for users the model has never seen (MovieLens-100k).

A seeded share of the users (with at least ``min_events`` ratings) is held out of training entirely.
The model (the pipeline's ALS defaults, popularity prior included) trains on the others. Each held-out
user then shows their first ``n`` items in time order: the session vector is solved from them as the
serving client does (:class:`~recsys_pipeline.refresh.SessionSolver`, the fold-in's update) and
their remaining items are the truth. Beside it, on the same users: the most popular items, and a full
retrain that saw the held-out users' first ``n`` items too.

Results per n: ``session_n{n}_ndcg_at_10``, ``popular_n{n}_ndcg_at_10``, ``retrain_n{n}_ndcg_at_10``,
``session_n{n}_lift_over_popular`` (session / popular) and ``session_n{n}_share_of_retrain``
(session / retrain). Target at n = 5: at least 2x popular, at least 0.8 of the retrain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.csv as csv
import scipy.sparse as sp

from recsys_pipeline.als import item_weights, train
from recsys_pipeline.config import PROJECT_ROOT, load_config
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.evaluate import EvaluationSet
from recsys_pipeline.refresh import SessionSolver

PARAMS: dict[str, Any] = {
    "held_out_share": 0.2,
    "min_events": 20,
    "sessions": [1, 3, 5, 10],
    "truth_items": 10,  # the truth: the next this many items after the session (None: all the rest)
    "k": 10,
    "seed": 0,
}


def ratings() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item index, timestamp) of every MovieLens-100k rating (ids 1..n become 0..n-1)."""
    table = csv.read_csv(
        PROJECT_ROOT / "data" / "ml-100k" / "u.data",
        read_options=csv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=csv.ParseOptions(delimiter="\t"),
    )
    return (
        table.column("user").to_numpy() - 1,
        table.column("item").to_numpy() - 1,
        table.column("ts").to_numpy(),
    )


def run(params: dict[str, Any]) -> dict[str, Any]:
    users, items, ts = ratings()
    shape = (int(users.max()) + 1, int(items.max()) + 1)
    order = np.lexsort((ts, users))  # each user's ratings in time order
    users, items = users[order], items[order]
    counts = np.bincount(users, minlength=shape[0])
    rng = np.random.default_rng(params["seed"])
    eligible = np.flatnonzero(counts >= params["min_events"])
    held_out = np.sort(rng.choice(eligible, int(len(eligible) * params["held_out_share"]), replace=False))
    is_held_out = np.isin(users, held_out)
    # Each event's position within its user's time-ordered history.
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(len(users)) - starts[users]
    als = load_config().als.model_copy(update={"sweep": None})
    results: dict[str, Any] = {"held_out_users": len(held_out), "als": als.hyperparameters()}

    def matrix(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(mask.sum(), np.float32), (users[mask], items[mask])), shape=shape)

    trained, _ = train(matrix(~is_held_out), als)
    items_dense = trained.dense_items(shape[1])
    solver = SessionSolver(items_dense[:, : als.factors], als, item_weights(matrix(~is_held_out), als))
    popularity = np.asarray(matrix(~is_held_out).getnnz(axis=0))
    for n in params["sessions"]:
        session = is_held_out & (position < n)
        later = is_held_out & (position >= n)
        if params["truth_items"] is not None:
            later &= position < n + params["truth_items"]
        seen, truth = matrix(session), matrix(later)
        relevant = [truth[u].indices for u in held_out]
        test = EvaluationSet(held_out, seen[held_out], relevant, popularity, shape)
        vectors = np.stack([solver.solve(seen[u].indices, seen[u].data.astype(np.float64)) for u in held_out])
        prior = np.full((len(held_out), trained.prior_dims), als.popularity_weight, np.float32)
        session_model = Embeddings(
            held_out,
            np.hstack([vectors, prior]),
            trained.item_idx,
            trained.item_factors,
            prior_dims=trained.prior_dims,
        )
        retrained, _ = train(matrix(~is_held_out | session), als)
        k = params["k"]
        scored = {
            "session": test.evaluate(session_model, k)["ndcg_at_10"],
            "popular": test.evaluate_popularity(k)["baseline_ndcg_at_10"],
            "retrain": test.evaluate(retrained, k)["ndcg_at_10"],
        }
        for name, value in scored.items():
            results[f"{name}_n{n}_ndcg_at_10"] = round(value, 4)
        results[f"session_n{n}_lift_over_popular"] = round(scored["session"] / scored["popular"], 3)
        results[f"session_n{n}_share_of_retrain"] = round(scored["session"] / scored["retrain"], 3)
    return results
