"""Offline evaluation on the time-based holdout, against a popularity baseline and the champion.

Metric definitions (binary relevance, ``rel`` = a user's holdout items not seen in training):

- ``precision_at_k`` = hits in the top k / k (k, not the list length: short lists are penalised)
- ``recall_at_k``    = hits in the top k / |rel|
- ``ndcg_at_k``      = DCG of the top k / DCG of an ideal list of min(|rel|, k) hits, log2 discount
- ``map_at_k``       = sum of precision at each hit position / min(|rel|, k)
- ``coverage_at_k``  = distinct items recommended to all evaluated users / items with a vector

Users without holdout items are not evaluated; averages are over evaluated users.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.als import Embeddings, matrix_shape, read_embeddings
from recsys_pipeline.config import GateConfig
from recsys_pipeline.runs import RunContext
from recsys_pipeline.tables import read_matrix

log = logging.getLogger(__name__)
NO_ITEM = -1


def ranking_metrics(
    recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int, catalogue_size: int
) -> dict[str, float]:
    """Mean ranking metrics over users with at least one relevant item.

    ``recommended`` is (users, >=k) item indices best first, padded with ``NO_ITEM``;
    ``relevant[u]`` holds user u's relevant item indices.
    """
    names = ("precision", "recall", "ndcg", "map")
    totals = dict.fromkeys(names, 0.0)
    evaluated = 0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for row, rel in zip(recommended[:, :k], relevant, strict=True):
        if len(rel) == 0:
            continue
        evaluated += 1
        hits = np.isin(row, rel) & (row != NO_ITEM)
        n_hits = hits.sum()
        totals["precision"] += n_hits / k
        totals["recall"] += n_hits / len(rel)
        totals["ndcg"] += float(discounts[: len(row)][hits].sum() / discounts[: min(len(rel), k)].sum())
        precision_at_hit = np.cumsum(hits) / np.arange(1, len(row) + 1)
        totals["map"] += float(precision_at_hit[hits].sum() / min(len(rel), k))
    shown = recommended[:, :k]
    coverage = len(np.unique(shown[shown != NO_ITEM])) / catalogue_size if catalogue_size else 0.0
    metrics = {f"{name}_at_{k}": totals[name] / evaluated if evaluated else 0.0 for name in names}
    metrics[f"coverage_at_{k}"] = coverage
    return metrics


def top_k(scores: np.ndarray, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """Best k columns per row of ``scores``, skipping excluded (nonzero) and -inf entries."""
    scores = scores.astype(np.float32, copy=True)
    rows, cols = exclude.nonzero()
    scores[rows, cols] = -np.inf
    k_eff = min(k, scores.shape[1])
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    best = np.take_along_axis(part, order, axis=1)
    best[~np.isfinite(np.take_along_axis(scores, best, axis=1))] = NO_ITEM
    if k_eff < k:
        best = np.hstack([best, np.full((len(best), k - k_eff), NO_ITEM)])
    return best


def recommend_exact(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    has_vector: np.ndarray,
    seen: sp.csr_matrix,
    k: int,
    batch_size: int = 4096,
) -> np.ndarray:
    """Exact top-k by dot product over items that have a vector, excluding seen items."""
    out = np.empty((len(user_vectors), k), dtype=np.int64)
    for start in range(0, len(user_vectors), batch_size):
        scores = user_vectors[start : start + batch_size] @ item_vectors.T
        scores[:, ~has_vector] = -np.inf
        out[start : start + batch_size] = top_k(scores, seen[start : start + batch_size], k)
    return out


def popular_items(popularity: np.ndarray) -> np.ndarray:
    """Items with any interaction, most popular first (ties keep index order)."""
    return np.argsort(-popularity, kind="stable")[: int((popularity > 0).sum())]


def first_unseen(
    items: np.ndarray, scores: np.ndarray, seen: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first k entries of a ranked list (items with their scores) whose item is not in ``seen``."""
    keep = ~np.isin(items, seen)
    return items[keep][:k], scores[keep][:k]


def recommend_popular(popularity: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """The k most popular unseen items for every row of ``seen``."""
    scores = np.broadcast_to(popularity.astype(np.float32), seen.shape)
    scores = np.where(popularity > 0, scores, -np.inf)
    return top_k(scores, seen, k)


@dataclass(frozen=True)
class EvaluationSet:
    """Users to evaluate, what they saw in training and what they went on to interact with."""

    users: np.ndarray
    seen: sp.csr_matrix
    relevant: list[np.ndarray]
    popularity: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def build(cls, train: sp.csr_matrix, holdout: sp.csr_matrix) -> EvaluationSet:
        holdout = holdout.tocsr()
        holdout_users = np.flatnonzero(np.diff(holdout.indptr) > 0)
        seen = train[holdout_users]
        relevant = [
            np.setdiff1d(holdout.indices[holdout.indptr[u] : holdout.indptr[u + 1]], seen[row].indices)
            for row, u in enumerate(holdout_users)
        ]
        return cls(holdout_users, seen, relevant, np.asarray(train.getnnz(axis=0)), train.shape)

    def evaluate(self, embeddings: Embeddings, k: int) -> dict[str, float]:
        """Metrics for the embeddings' top-k lists (see :meth:`recommend`)."""
        recommended, catalogue_size = self.recommend(embeddings, k)
        return ranking_metrics(recommended, self.relevant, k, catalogue_size)

    def recommend(self, embeddings: Embeddings, k: int) -> tuple[np.ndarray, int]:
        """(top-k per evaluated user, items with a vector); users without a vector get the popularity
        list, as in serving."""
        n_users, n_items = self.shape
        known_items = embeddings.item_idx[embeddings.item_idx < n_items]
        has_vector = np.zeros(n_items, dtype=bool)
        has_vector[known_items] = True
        keep_users = embeddings.user_idx < n_users
        users = Embeddings(
            embeddings.user_idx[keep_users],
            embeddings.user_factors[keep_users],
            known_items,
            embeddings.item_factors[embeddings.item_idx < n_items],
        )
        recommended = recommend_exact(
            users.dense_users(n_users)[self.users], users.dense_items(n_items), has_vector, self.seen, k
        )
        unknown = ~np.isin(self.users, users.user_idx)
        if unknown.any():
            recommended[unknown] = recommend_popular(self.popularity, self.seen[unknown], k)
        return recommended, int(has_vector.sum())

    def evaluate_popularity(self, k: int) -> dict[str, float]:
        recommended = recommend_popular(self.popularity, self.seen, k)
        metrics = ranking_metrics(recommended, self.relevant, k, int((self.popularity > 0).sum()))
        return {f"baseline_{name}": value for name, value in metrics.items()}


def gate(metrics: dict[str, float], k: int, config: GateConfig) -> tuple[bool, list[str]]:
    """The candidate must beat the baseline and stay within a margin of the champion on nDCG@k."""
    ndcg, baseline = metrics[f"ndcg_at_{k}"], metrics[f"baseline_ndcg_at_{k}"]
    reasons = []
    if ndcg <= baseline + config.min_lift_over_baseline:
        reasons.append(
            f"ndcg_at_{k}={ndcg:.4f} does not beat baseline_ndcg_at_{k}={baseline:.4f} "
            f"by more than {config.min_lift_over_baseline}"
        )
    champion = metrics.get(f"champion_ndcg_at_{k}")
    if champion is not None and ndcg < champion - config.max_drop_vs_champion:
        reasons.append(
            f"ndcg_at_{k}={ndcg:.4f} is more than {config.max_drop_vs_champion} below "
            f"the champion's {champion:.4f} on the same holdout"
        )
    return not reasons, reasons


def run_evaluation(run: RunContext) -> dict[str, float]:
    """Evaluate the run's model, the popularity baseline and (if any) the champion on the same holdout."""
    from recsys_pipeline.publish import champion_embeddings

    champion = champion_embeddings(run.config)
    interactions_dir = run.stage_dir("interactions")
    shape = matrix_shape(interactions_dir)
    train = read_matrix(interactions_dir / "train").to_csr(*shape)
    holdout = read_matrix(interactions_dir / "holdout").to_csr(*shape)
    evaluation = EvaluationSet.build(train, holdout)
    k = run.config.evaluation.k
    metrics = evaluation.evaluate(read_embeddings(run.stage_dir("model")), k)
    metrics.update(evaluation.evaluate_popularity(k))
    metrics["eval_users"] = float(sum(len(rel) > 0 for rel in evaluation.relevant))
    if champion is not None:
        metrics.update(
            {f"champion_{name}": value for name, value in evaluation.evaluate(champion, k).items()}
        )
    passed, reasons = gate(metrics, k, run.config.evaluation.gate)
    run.write_metrics("evaluate", metrics)
    run.write_gate("evaluation", passed, reasons)
    log.info("evaluation gate %s %s", "passed" if passed else "failed", reasons)
    return metrics
