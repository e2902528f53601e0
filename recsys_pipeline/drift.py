"""Embedding drift between two model versions, measured so that it ignores rotations.

ALS factors are only defined up to an orthogonal transform, so per-dimension comparisons
are meaningless. Everything here is invariant to rotating a version's user and item
factors together:

- ``drift_neighbour_retention``: how close each shared item's old top-k cosine neighbours still are in
  the new version, as a share of how close its new top-k are (1: as close as the nearest; about 0:
  as far as any item);
- ``drift_neighbour_overlap``: mean Jaccard of each shared item's top-k cosine neighbours, old vs new
  (how much "similar items" lists churn: in a large catalogue, many near-tied neighbours trade
  places between two retrains of the same data, so this falls with catalogue size while the
  geometry holds);
- ``drift_aligned_cosine``: mean cosine between new and old item vectors after orthogonal Procrustes
  alignment of new onto old on the shared items;
- ``drift_rec_overlap``: mean Jaccard of top-k recommendations (by dot product) for sampled shared users;
- ``drift_norm_ks`` / ``drift_norm_psi``: shift of the item-norm distribution (KS statistic, PSI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ks_2samp

from recsys_pipeline.config import DriftConfig
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.index import exact_top_k


@dataclass(frozen=True)
class DriftReport:
    metrics: dict[str, float]
    items: pd.DataFrame  # item_idx, neighbour_jaccard, neighbour_retention, aligned_cosine


def _shared(idx_old: np.ndarray, idx_new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shared, rows_old, rows_new = np.intersect1d(idx_old, idx_new, return_indices=True)
    return shared, rows_old, rows_new


def _pad(matrix: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad factors so versions with different factor counts can be aligned."""
    return np.pad(matrix, ((0, 0), (0, width - matrix.shape[1])))


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def jaccard_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: Jaccard of row ``a[i]`` and row ``b[i]``, each a top-k list (distinct entries); all
    rows compared at once, as a (rows x k x k) match table."""
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return shared / (a.shape[1] + b.shape[1] - shared)


def _without_self(neighbours: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.array([row[row != query][:k] for row, query in zip(neighbours, queries, strict=True)])


def neighbour_agreement(
    old: np.ndarray, new: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: (Jaccard of its k nearest (cosine) other rows in old vs new, retention: the mean
    new-space cosine to its old k nearest over the mean to its new k nearest).

    Retention tells reshuffled near-ties (old neighbours still about as close: near 1) from a moved
    geometry (old neighbours now far: near 0), which Jaccard alone cannot in a dense catalogue.
    """
    old_unit, new_unit = _unit(old), _unit(new)
    # k + 1 because each item is its own nearest neighbour.
    old_nn = _without_self(exact_top_k(old_unit[queries], old_unit, k + 1), queries, k)
    new_nn = _without_self(exact_top_k(new_unit[queries], new_unit, k + 1), queries, k)
    query_unit = new_unit[queries][:, None, :]
    kept = np.sum(query_unit * new_unit[old_nn], axis=2).mean(axis=1)
    nearest = np.sum(query_unit * new_unit[new_nn], axis=2).mean(axis=1)
    return jaccard_rows(old_nn, new_nn), kept / np.maximum(nearest, 1e-12)


def aligned_cosine(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per row: cosine of new (rotated onto old by orthogonal Procrustes) with old."""
    width = max(old.shape[1], new.shape[1])
    old_p, new_p = _pad(old, width), _pad(new, width)
    rotation, _ = orthogonal_procrustes(new_p, old_p)
    return np.sum(_unit(new_p @ rotation) * _unit(old_p), axis=1)


def population_stability(old: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    edges = np.unique(np.quantile(old, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.histogram(old, edges)[0] / len(old) + 1e-6
    actual = np.histogram(new, edges)[0] / len(new) + 1e-6
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def compare(
    old: Embeddings, new: Embeddings, k: int, sample_items: int, sample_users: int, seed: int = 0
) -> DriftReport:
    """Drift of ``new`` against ``old`` on the users and items present in both.

    Only learned item vectors are compared: a cold item's vector is mapped from its content, so its
    swap for a learned one (or a re-mapping) is not drift.
    """
    rng = np.random.default_rng(seed)
    old, new = old.warm_items(), new.warm_items()
    # Geometry is compared on the learned dimensions (the popularity prior's are no direction),
    # recommendations as they are served, with every dimension.
    old_learned, new_learned = old.learned(), new.learned()
    items, item_old, item_new = _shared(old.item_idx, new.item_idx)
    if len(items) <= k:
        raise RecsysError(
            f"only {len(items)} items are shared by both versions: too few to measure drift at k={k}; "
            "lower drift.k or compare against a version with more items in common"
        )
    old_items, new_items = old_learned.item_factors[item_old], new_learned.item_factors[item_new]
    queries = np.sort(rng.choice(len(items), min(sample_items, len(items)), replace=False))
    jaccard, retention = neighbour_agreement(old_items, new_items, queries, k)
    cosine = aligned_cosine(old_items, new_items)

    users, user_old, user_new = _shared(old.user_idx, new.user_idx)
    picked = np.sort(rng.choice(len(users), min(sample_users, len(users)), replace=False))
    rec_old = exact_top_k(old.user_factors[user_old[picked]], old.item_factors[item_old], k)
    rec_new = exact_top_k(new.user_factors[user_new[picked]], new.item_factors[item_new], k)
    rec_overlap = jaccard_rows(rec_old, rec_new) if len(picked) else np.array([1.0])

    old_norms, new_norms = np.linalg.norm(old_items, axis=1), np.linalg.norm(new_items, axis=1)
    jaccard_column, retention_column = np.full(len(items), np.nan), np.full(len(items), np.nan)
    jaccard_column[queries], retention_column[queries] = jaccard, retention
    table = pd.DataFrame(
        {
            "item_idx": items,
            "neighbour_jaccard": jaccard_column,
            "neighbour_retention": retention_column,
            "aligned_cosine": cosine,
        }
    )
    metrics = {
        "drift_shared_items": float(len(items)),
        "drift_shared_users": float(len(users)),
        "drift_neighbour_overlap": float(jaccard.mean()),
        "drift_neighbour_retention": float(retention.mean()),
        "drift_aligned_cosine": float(cosine.mean()),
        "drift_rec_overlap": float(rec_overlap.mean()),
        "drift_norm_ks": float(ks_2samp(old_norms, new_norms, method="asymp").statistic),
        "drift_norm_psi": population_stability(old_norms, new_norms),
    }
    return DriftReport(metrics, table)


def write_report(report: DriftReport, directory: Path, against: str, rules: DriftConfig) -> None:
    """Keep ``report`` (of some model against version ``against`` under ``rules``) for a later stage."""
    directory.mkdir(parents=True, exist_ok=True)
    report.items.to_parquet(directory / "items.parquet")
    key = {"against": against, **_sampling(rules)}
    (directory / "metrics.json").write_text(json.dumps({"key": key, "metrics": report.metrics}))


def read_report(directory: Path, against: str, rules: DriftConfig) -> DriftReport | None:
    """The report kept in ``directory`` if it compared against version ``against`` under the same
    sampling as ``rules``; None otherwise."""
    path = directory / "metrics.json"
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept["key"] != {"against": against, **_sampling(rules)}:
        return None
    return DriftReport(kept["metrics"], pd.read_parquet(directory / "items.parquet"))


def _sampling(rules: DriftConfig) -> dict[str, object]:
    # What a kept report measured is part of its key: one from before a measure existed is redone.
    measures = ["neighbour_jaccard", "neighbour_retention", "aligned_cosine"]
    return {
        "k": rules.k,
        "sample_items": rules.sample_items,
        "sample_users": rules.sample_users,
        "measures": measures,
    }


def violations(metrics: dict[str, float], bounds: DriftConfig) -> list[str]:
    """Which configured drift bounds the metrics break, each as a readable reason."""
    checks = [
        (
            "drift_neighbour_retention",
            metrics["drift_neighbour_retention"] < bounds.min_neighbour_retention,
            f">= {bounds.min_neighbour_retention}",
        ),
        (
            "drift_neighbour_overlap",
            metrics["drift_neighbour_overlap"] < bounds.min_neighbour_overlap,
            f">= {bounds.min_neighbour_overlap}",
        ),
        (
            "drift_aligned_cosine",
            metrics["drift_aligned_cosine"] < bounds.min_aligned_cosine,
            f">= {bounds.min_aligned_cosine}",
        ),
        (
            "drift_rec_overlap",
            metrics["drift_rec_overlap"] < bounds.min_rec_overlap,
            f">= {bounds.min_rec_overlap}",
        ),
        ("drift_norm_ks", metrics["drift_norm_ks"] > bounds.max_norm_ks, f"<= {bounds.max_norm_ks}"),
    ]
    return [f"{name}={metrics[name]:.3f}, expected {bound}" for name, broken, bound in checks if broken]


def plot(report: DriftReport, path: Path) -> None:
    """Histograms of per-item neighbour overlap, neighbour retention and aligned cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(report.items["neighbour_jaccard"].dropna(), bins=20, range=(0, 1))
    axes[0].set(
        title=f"top-k neighbour Jaccard (mean {report.metrics['drift_neighbour_overlap']:.3f})",
        xlabel="Jaccard",
        ylabel="items",
    )
    axes[1].hist(report.items["neighbour_retention"].dropna(), bins=20, range=(0, 1))
    axes[1].set(
        title=f"top-k neighbour retention (mean {report.metrics['drift_neighbour_retention']:.3f})",
        xlabel="old neighbours' cosine / new neighbours'",
    )
    axes[2].hist(report.items["aligned_cosine"], bins=20, range=(-1, 1))
    axes[2].set(
        title=f"Procrustes-aligned cosine (mean {report.metrics['drift_aligned_cosine']:.3f})",
        xlabel="cosine",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
