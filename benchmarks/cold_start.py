"""Item cold start on the bundled MovieLens-100k: how well content-mapped vectors place unseen items.

A seeded ``cold_share`` of the items is held out entirely (every interaction of theirs) from ALS
training, with the pipeline's own ALS settings. The configured content encoder (``builtin``: title
TF-IDF and the 19 genre flags) and the ridge map fitted on the trained items give each held-out item
a vector. For every user who interacted with held-out items, the held-out items are ranked for them
and scored against the items they did interact with, at k = 10, beside:

* ``random``: the held-out items in a random order (the mean of ``random_draws`` seeded orders);
* ``genre_popularity``: each held-out item scored by how many training interactions its genres
  have (the same order for everyone, what a genre-aware shelf without a model would show);
* peers, when installed (``peers``): LightFM with the same item features (identity for trained
  items plus genres; a held-out item has only its genres), WARP loss. Otherwise the reason it did not
  run.

``warm_ndcg_at_10`` checks warm quality is unchanged: nDCG@10 on a random fifth of the trained items'
interactions, with the cold items in the catalogue, beside ``warm_ndcg_at_10_without_cold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import scipy.sparse as sp

from recsys_pipeline.als import train
from recsys_pipeline.config import load_config
from recsys_pipeline.content import encode_items, fit_content_map, read_metadata, with_content_vectors
from recsys_pipeline.evaluate import per_user_metrics
from recsys_pipeline.ranking import exclude, top_k

PARAMS: dict[str, Any] = {
    "cold_share": 0.2,
    "k": 10,
    "seed": 0,
    "random_draws": 20,
    "warm_holdout_share": 0.2,
}


def ratings() -> sp.csr_matrix:
    """The sample's (users x items) matrix of rating confidences as the pipeline weighs them."""
    config = load_config()
    table = pacsv.read_csv(
        config.source.path,
        read_options=pacsv.ReadOptions(column_names=["user", "item", "rating", "ts"]),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
    )
    value_map = config.interactions.event_weights["rating"].value_map or {}
    rating = table.column("rating").to_numpy()
    weight = np.interp(rating, sorted(value_map), [value_map[key] for key in sorted(value_map)])
    users, items = table.column("user").to_numpy() - 1, table.column("item").to_numpy() - 1
    return sp.csr_matrix(
        (weight.astype(np.float32), (users, items)), shape=(users.max() + 1, items.max() + 1)
    )


def rank_metrics(scores: np.ndarray, relevant: list[np.ndarray], k: int) -> dict[str, float]:
    best, _ = top_k(scores.astype(np.float32), k)
    per_user = per_user_metrics(best, relevant, k)
    return {name: float(values.mean()) for name, values in per_user.items()}


def lightfm_peer(
    train_matrix: sp.csr_matrix, genres: np.ndarray, cold: np.ndarray, users: np.ndarray, relevant, k: int
) -> dict[str, float] | str:
    try:
        from lightfm import LightFM
    except ImportError:
        return (
            "not installed (optional): pip install 'setuptools<70' wheel cython && "
            "pip install --no-build-isolation lightfm"
        )
    n_items = train_matrix.shape[1]
    identity = sp.identity(n_items, format="csr", dtype=np.float32)
    identity = identity.multiply(~np.isin(np.arange(n_items), cold)[:, None]).tocsr()
    features = sp.hstack([identity, sp.csr_matrix(genres.astype(np.float32))]).tocsr()
    model = LightFM(loss="warp", no_components=32, random_state=0)
    model.fit((train_matrix > 0).astype(np.float32).tocoo(), item_features=features, epochs=30, num_threads=2)
    scores = np.stack(
        [model.predict(int(user), cold, item_features=features, num_threads=2) for user in users]
    )
    metrics = rank_metrics(scores, relevant, k)
    return {"recall_at_10": metrics[f"recall_at_{k}"], "ndcg_at_10": metrics[f"ndcg_at_{k}"]}


def run(params: dict[str, Any]) -> dict[str, Any]:
    config = load_config()
    k, rng = params["k"], np.random.default_rng(params["seed"])
    matrix = ratings()
    n_users, n_items = matrix.shape
    cold = np.sort(rng.choice(n_items, int(n_items * params["cold_share"]), replace=False))
    is_cold = np.isin(np.arange(n_items), cold)
    warm_matrix = matrix.multiply(~is_cold).tocsr()
    warm_matrix.eliminate_zeros()

    # Warm quality: a random fifth of the trained items' interactions held out from training.
    coo = warm_matrix.tocoo()
    held = rng.random(coo.nnz) < params["warm_holdout_share"]
    fit_matrix = sp.csr_matrix((coo.data[~held], (coo.row[~held], coo.col[~held])), shape=matrix.shape)
    held_matrix = sp.csr_matrix((coo.data[held], (coo.row[held], coo.col[held])), shape=matrix.shape)

    learned, _ = train(fit_matrix, config.als)
    trained = learned.item_idx
    user_factors = learned.dense_users(n_users)

    items = read_metadata(config.content.source).items  # type: ignore[arg-type]
    item_idx = np.asarray(items.column("item_id").to_pylist(), dtype=int) - 1
    rows, vectors = encode_items(items, config.content)
    content_idx = item_idx[rows]
    by_item = np.zeros((n_items, vectors.shape[1]), dtype=np.float32)
    by_item[content_idx] = vectors
    content_map = fit_content_map(by_item[trained], learned.item_factors, config.content.map)
    counts = np.asarray(fit_matrix.getnnz(axis=0)).ravel()
    served = with_content_vectors(learned, content_idx, content_map.apply(vectors), counts, None)
    served_items = served.dense_items(n_items)

    cold_matrix = matrix[:, cold].tocsr()
    users = np.flatnonzero(np.diff(cold_matrix.indptr) > 0)
    relevant = [cold_matrix[user].indices for user in users]
    ours = rank_metrics(user_factors[users] @ served_items[cold].T, relevant, k)
    random = [
        rank_metrics(rng.random((len(users), len(cold))), relevant, k) for _ in range(params["random_draws"])
    ]
    genre_names = config.content.source.numeric_columns  # type: ignore[union-attr]
    genres = np.zeros((n_items, len(genre_names)), dtype=bool)
    genres[item_idx] = (
        np.column_stack([np.asarray(items.column(name).to_pylist(), dtype=int) for name in genre_names]) > 0
    )
    genre_counts = genres.T.astype(np.float64) @ counts
    genre_score = (genres[cold] * genre_counts).sum(axis=1) / np.maximum(genres[cold].sum(axis=1), 1)
    by_genre = rank_metrics(np.tile(genre_score, (len(users), 1)), relevant, k)

    def warm_ndcg(item_vectors: np.ndarray) -> float:
        evaluated = np.flatnonzero(np.diff(held_matrix.indptr) > 0)
        scores = user_factors[evaluated] @ item_vectors.T
        exclude(scores, fit_matrix[evaluated])
        return rank_metrics(scores, [held_matrix[user].indices for user in evaluated], k)[f"ndcg_at_{k}"]

    return {
        "cold_items": len(cold),
        "cold_users": len(users),
        "cold_recall_at_10": ours[f"recall_at_{k}"],
        "cold_ndcg_at_10": ours[f"ndcg_at_{k}"],
        "random_recall_at_10": float(np.mean([draw[f"recall_at_{k}"] for draw in random])),
        "random_ndcg_at_10": float(np.mean([draw[f"ndcg_at_{k}"] for draw in random])),
        "genre_popularity_recall_at_10": by_genre[f"recall_at_{k}"],
        "genre_popularity_ndcg_at_10": by_genre[f"ndcg_at_{k}"],
        "peers": {"lightfm": lightfm_peer(fit_matrix, genres, cold, users, relevant, k)},
        "warm_ndcg_at_10": warm_ndcg(served_items),
        "warm_ndcg_at_10_without_cold": warm_ndcg(learned.dense_items(n_items)),
        "content_map_r2": content_map.r2,
        "content_map_cosine": content_map.cosine,
        "encoder": config.content.encoder,
    }
