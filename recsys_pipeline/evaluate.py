"""Offline evaluation on the time-based holdout, against a popularity baseline and the champion.

Metric definitions (binary relevance, ``rel`` = a user's holdout items not seen in training):

- ``precision_at_k`` = hits in the top k / k (k, not the list length: short lists are penalised)
- ``recall_at_k``    = hits in the top k / |rel|
- ``ndcg_at_k``      = DCG of the top k / DCG of an ideal list of min(|rel|, k) hits, log2 discount
- ``map_at_k``       = sum of precision at each hit position / min(|rel|, k)
- ``coverage_at_k``  = distinct items recommended to all evaluated users / items with a vector

Users without holdout items are not evaluated; averages are over evaluated users. Each mean
also gets a percentile-bootstrap confidence interval over those users (``<metric>_ci_low`` and
``<metric>_ci_high``), so a difference can be read against the noise of a small holdout.

The gate compares models on the same users by a paired bootstrap of their per-user nDCG
differences (:func:`gate`), so it decides on a lift that holds with the configured confidence
rather than on two means that differ by noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recsys_pipeline.config import GateConfig
from recsys_pipeline.embeddings import Embeddings, presence_mask
from recsys_pipeline.ranking import NO_ITEM, dot_top_k, pad, popular_unseen
from recsys_pipeline.sets import distinct, member_of

USER_METRICS = ("precision", "recall", "ndcg", "map")


def per_user_metrics(
    recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int
) -> dict[str, np.ndarray]:
    """``{metric_at_k: one value per user with at least one relevant item}``.

    ``recommended`` is (users, >=k) item indices best first, padded with ``NO_ITEM``;
    ``relevant[u]`` holds user u's relevant item indices. Hits are found for every user at once, as
    (user, item) keys looked up in one sorted array: a lookup per user cost 3 s of a 20,000-user
    evaluation.
    """
    shown = recommended[:, :k]
    counts = np.fromiter((len(rel) for rel in relevant), dtype=np.int64, count=len(relevant))
    users = np.arange(len(shown), dtype=np.int64)[:, None]
    relevant_items = np.concatenate([np.empty(0, np.int64), *(np.asarray(rel, np.int64) for rel in relevant)])
    base = int(max(shown.max(initial=0), relevant_items.max(initial=0))) + 1
    hits = member_of(users * base + shown, np.repeat(users[:, 0], counts) * base + relevant_items) & (
        shown != NO_ITEM
    )
    hits, counts = hits[counts > 0], counts[counts > 0]
    ideal = np.minimum(counts, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal_gain = np.cumsum(discounts)[ideal - 1]
    n_hits = hits.sum(axis=1)
    precision_at_hit = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    values = {
        "precision": n_hits / k,
        "recall": n_hits / counts,
        "ndcg": (hits * discounts[: hits.shape[1]]).sum(axis=1) / ideal_gain,
        "map": (hits * precision_at_hit).sum(axis=1) / ideal,
    }
    return {f"{name}_at_{k}": np.asarray(values[name], dtype=np.float64) for name in USER_METRICS}


def bootstrap_means(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of ``resamples`` resamples of ``values`` (users drawn with replacement). A 2-D ``values``
    holds one metric per row (users in columns): its rows are resampled with the same draws, one row
    of means each, for a draw costs far more than the means over it."""
    rows = np.atleast_2d(values)
    users = rows.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty((len(rows), resamples))
    # In blocks, so the resample indices stay small whatever the number of users.
    block = max(1, (1 << 22) // users)
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        drawn = rng.integers(0, users, (count, users))
        for row, metric in zip(means, rows, strict=True):
            row[start : start + count] = metric[drawn].mean(axis=1)
    return means if values.ndim == 2 else means[0]


def bootstrap_intervals(
    rows: np.ndarray, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """Percentile-bootstrap intervals (low, high) of the mean of each row of ``rows`` (one metric per
    row, users in columns; users resampled with replacement)."""
    if rows.shape[1] == 0:
        return np.zeros((len(rows), 2))
    tail = (1 - confidence) / 2
    return np.quantile(bootstrap_means(rows, resamples, seed), [tail, 1 - tail], axis=1).T


def bootstrap_interval(
    values: np.ndarray, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """:func:`bootstrap_intervals` of one metric."""
    low, high = bootstrap_intervals(values[None, :], confidence, resamples, seed)[0]
    return float(low), float(high)


@dataclass(frozen=True)
class Lift:
    """A candidate's mean per-user lift over a reference model on the same users.

    ``ci_low`` is the one-sided lower bound at the test's confidence; ``p`` the share of bootstrap
    resamples whose mean lift is at or below the threshold tested (a one-sided p-value).
    """

    mean: float
    ci_low: float
    p: float


def paired_lift(
    candidate: np.ndarray,
    reference: np.ndarray,
    threshold: float,
    confidence: float,
    resamples: int = 2000,
    seed: int = 0,
) -> Lift:
    """Paired bootstrap of ``candidate - reference`` (one value per user, same users in both):
    resampling users keeps each user's two scores together, so what users share cancels out."""
    if len(candidate) == 0:
        return Lift(0.0, 0.0, 1.0)
    means = bootstrap_means(candidate - reference, resamples, seed)
    return Lift(
        mean=float((candidate - reference).mean()),
        ci_low=float(np.quantile(means, 1 - confidence)),
        p=float((means <= threshold).mean()),
    )


@dataclass(frozen=True)
class Scores:
    """One model's metrics per evaluated user (the same users, in the same order, for every model
    scored on one evaluation set) and its catalogue coverage."""

    per_user: dict[str, np.ndarray]
    coverage: float
    k: int

    @property
    def users(self) -> int:
        return len(next(iter(self.per_user.values())))

    def summary(self, confidence: float | None = None, prefix: str = "") -> dict[str, float]:
        """Means over users and ``coverage_at_k``, each name after ``prefix``; with ``confidence``, each
        mean's bootstrap interval as ``<metric>_ci_low`` / ``<metric>_ci_high``."""
        metrics: dict[str, float] = {}
        names = list(self.per_user)
        intervals = (
            bootstrap_intervals(np.vstack([self.per_user[name] for name in names]), confidence)
            if confidence is not None
            else None
        )
        for position, name in enumerate(names):
            values = self.per_user[name]
            metrics[name] = float(values.mean()) if len(values) else 0.0
            if intervals is not None:
                metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = map(float, intervals[position])
        metrics[f"coverage_at_{self.k}"] = self.coverage
        return {f"{prefix}{name}": value for name, value in metrics.items()}


def scores(recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int, catalogue_size: int) -> Scores:
    shown = recommended[:, :k]
    coverage = len(distinct(shown[shown != NO_ITEM])) / catalogue_size if catalogue_size else 0.0
    return Scores(per_user_metrics(recommended, relevant, k), coverage, k)


def ranking_metrics(
    recommended: np.ndarray,
    relevant: Sequence[np.ndarray],
    k: int,
    catalogue_size: int,
    confidence: float | None = None,
) -> dict[str, float]:
    """Mean ranking metrics over users with at least one relevant item, and ``coverage_at_k``; with
    ``confidence``, each mean's bootstrap interval as ``<metric>_ci_low`` / ``<metric>_ci_high``."""
    return scores(recommended, relevant, k, catalogue_size).summary(confidence)


def row_difference(rows: sp.csr_matrix, taken: sp.csr_matrix) -> list[np.ndarray]:
    """Per row, the sorted distinct columns of ``rows`` that the same row of ``taken`` does not hold
    (``np.setdiff1d`` row by row, in one pass over every row: a loop over tens of thousands of users
    costs seconds)."""
    if rows.shape[0] == 0:
        return []
    rows, taken = rows.tocsr().copy(), taken.tocsr()
    rows.sum_duplicates()  # sorted, distinct columns per row
    n_cols = np.int64(max(rows.shape[1], 1))

    def keys(matrix: sp.csr_matrix) -> np.ndarray:
        row_of = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
        return row_of * n_cols + matrix.indices

    kept = ~member_of(keys(rows), keys(taken))
    row_of_kept = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))[kept]
    bounds = np.searchsorted(row_of_kept, np.arange(1, rows.shape[0]))
    return np.split(rows.indices[kept], bounds)


def sampled_users(holdout: sp.csr_matrix, max_users: int | None, seed: int) -> np.ndarray:
    """The holdout's users (sorted indices), or a seeded sample of ``max_users`` of them: evaluation's
    memory and time then depend on the sample, not on how many users the holdout has."""
    holdout_users = np.flatnonzero(np.diff(holdout.tocsr().indptr) > 0)
    if max_users is not None and len(holdout_users) > max_users:
        rng = np.random.default_rng(seed)
        holdout_users = np.sort(rng.choice(holdout_users, max_users, replace=False))
    return holdout_users


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
        """The holdout's users, or a seeded sample of ``max_users`` of them (:func:`sampled_users`).
        Every model evaluated on one set is scored on the same users, so comparisons between them are
        paired."""
        users = sampled_users(holdout, max_users, seed)
        return cls.of_users(users, train, holdout, np.asarray(train.getnnz(axis=0)))

    @classmethod
    def of_users(
        cls, users: np.ndarray, train: sp.csr_matrix, holdout: sp.csr_matrix, popularity: np.ndarray
    ) -> EvaluationSet:
        """The set of ``users`` (sorted indices), from matrices that need only hold their rows, with
        every item's count of training users ``popularity`` (the baseline's ranking)."""
        seen = train[users]
        relevant = row_difference(holdout.tocsr()[users], seen)
        return cls(users, seen, relevant, popularity, train.shape)

    def without(self, user_idx: np.ndarray, item_idx: np.ndarray) -> EvaluationSet:
        """The same users with the (``user_idx``, ``item_idx``) pairs taken out of what they go on to
        interact with: a model trained on those pairs (an older champion, on earlier events of a pair
        the holdout took whole) would be scored on what it was fitted to."""
        # Only the evaluated users' pairs: a matrix of all of them took 0.9 s at 20M events.
        theirs = presence_mask(self.users, self.shape[0])[user_idx]
        pairs = (user_idx[theirs], item_idx[theirs])
        trained = sp.csr_matrix((np.ones(len(pairs[0]), dtype=np.int8), pairs), shape=self.shape)[self.users]
        lengths = [len(items) for items in self.relevant]
        relevant_rows = sp.csr_matrix(
            (
                np.ones(sum(lengths), dtype=np.int8),
                np.concatenate([np.zeros(0, dtype=np.int64), *self.relevant]),
                np.concatenate([[0], np.cumsum(lengths)]),
            ),
            shape=(len(self.users), self.shape[1]),
        )
        relevant = row_difference(relevant_rows, trained)
        return EvaluationSet(self.users, self.seen, relevant, self.popularity, self.shape)

    def scores(self, embeddings: Embeddings, k: int) -> Scores:
        """Per-user metrics of the embeddings' top-k lists (see :meth:`recommend`)."""
        recommended, catalogue_size = self.recommend(embeddings, k)
        return scores(recommended, self.relevant, k, catalogue_size)

    def popularity_recommendations(self, k: int) -> np.ndarray:
        """Each evaluated user's k most popular unseen items (the baseline)."""
        return popular_unseen(self.popularity, self.seen, k)

    def popularity_scores(self, k: int) -> Scores:
        return scores(self.popularity_recommendations(k), self.relevant, k, int((self.popularity > 0).sum()))

    def evaluate(self, embeddings: Embeddings, k: int, confidence: float | None = None) -> dict[str, float]:
        """Metrics for the embeddings' top-k lists, with intervals if asked."""
        return self.scores(embeddings, k).summary(confidence)

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

    def evaluate_popularity(self, k: int, confidence: float | None = None) -> dict[str, float]:
        return self.popularity_scores(k).summary(confidence, "baseline_")


def gate(
    candidate: Scores,
    baseline: Scores,
    champion: Scores | None,
    config: GateConfig,
    confidence: float,
    candidate_vs_champion: Scores | None = None,
) -> tuple[bool, list[str], dict[str, float]]:
    """(passed, reasons, figures): paired bootstrap tests on ndcg@k over the same users.

    The candidate passes when its lift over the popularity baseline is above
    ``min_lift_over_baseline``, and its lift over the champion above ``-max_drop_vs_champion``, each
    with probability ``confidence``. ``candidate_vs_champion`` is the candidate's scores on the pairs
    the champion was scored on, when those are not all of ``candidate``'s (see
    :meth:`EvaluationSet.without`). ``figures`` holds ``lift_over_<reference>_ndcg_at_k`` with its
    one-sided ``_ci_low`` and ``_p`` (the bootstrap share of resamples at or below the threshold).
    """
    metric = f"ndcg_at_{candidate.k}"
    tests = [("baseline", candidate, baseline, config.min_lift_over_baseline)]
    if champion is not None:
        tests.append(("champion", candidate_vs_champion or candidate, champion, -config.max_drop_vs_champion))
    reasons: list[str] = []
    figures: dict[str, float] = {}
    for name, scored, reference, threshold in tests:
        lift = paired_lift(
            scored.per_user[metric], reference.per_user[metric], threshold, confidence, config.resamples
        )
        key = f"lift_over_{name}_{metric}"
        figures.update({key: lift.mean, f"{key}_ci_low": lift.ci_low, f"{key}_p": lift.p})
        if lift.p > 1 - confidence:
            reasons.append(
                f"{metric} lift over the {name} is {lift.mean:+.4f} on {scored.users} users, not above "
                f"{threshold:+.4f} with {confidence:.0%} confidence (lower bound {lift.ci_low:+.4f}, "
                f"p={lift.p:.3f})"
            )
    return not reasons, reasons, figures
