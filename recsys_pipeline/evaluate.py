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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.config import GateConfig
from recsys_pipeline.embeddings import Embeddings, presence_mask
from recsys_pipeline.ranking import NO_ITEM, dot_top_k, pad, popular_unseen


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


@dataclass(frozen=True)
class EvaluationSet:
    """Users to evaluate, what they saw in training and what they went on to interact with."""

    users: np.ndarray
    seen: sp.csr_matrix
    relevant: list[np.ndarray]
    popularity: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def build(
        cls,
        train: sp.csr_matrix,
        holdout: sp.csr_matrix,
        max_users: int | None = None,
        seed: int = 0,
    ) -> EvaluationSet:
        """The holdout's users, or a seeded sample of ``max_users`` of them: evaluation's memory and time
        then depend on the sample, not on how many users the holdout has. Every model evaluated on
        one set is scored on the same users, so comparisons between them are paired."""
        holdout = holdout.tocsr()
        holdout_users = np.flatnonzero(np.diff(holdout.indptr) > 0)
        if max_users is not None and len(holdout_users) > max_users:
            rng = np.random.default_rng(seed)
            holdout_users = np.sort(rng.choice(holdout_users, max_users, replace=False))
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
        n_items = self.shape[1]
        in_catalogue = embeddings.item_idx < n_items
        has_vector = presence_mask(embeddings.item_idx, n_items)
        item_vectors = np.zeros((n_items, embeddings.item_factors.shape[1]), dtype=np.float32)
        item_vectors[embeddings.item_idx[in_catalogue]] = embeddings.item_factors[in_catalogue]
        order = np.argsort(embeddings.user_idx, kind="stable")
        position = np.clip(np.searchsorted(embeddings.user_idx[order], self.users), 0, max(len(order) - 1, 0))
        known = (
            embeddings.user_idx[order][position] == self.users
            if len(order)
            else np.zeros(len(self.users), dtype=bool)
        )
        recommended = np.full((len(self.users), k), NO_ITEM, dtype=np.int64)
        if known.any():
            ranked, _ = dot_top_k(
                embeddings.user_factors[order[position[known]]],
                item_vectors,
                k,
                allowed=has_vector,
                seen=self.seen[np.flatnonzero(known)],
            )
            recommended[known] = pad(ranked, k)
        if (~known).any():
            recommended[~known] = popular_unseen(self.popularity, self.seen[np.flatnonzero(~known)], k)
        return recommended, int(has_vector.sum())

    def evaluate_popularity(self, k: int) -> dict[str, float]:
        recommended = popular_unseen(self.popularity, self.seen, k)
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
