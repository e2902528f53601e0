"""Ranking quality under the Microsoft Recommenders protocol, on the configured source, with peers
trained and scored on the identical split in the same process.

Protocol (as in their benchmark notebook): a per-user stratified random split, 75% train /
25% test, seed 42; top-10 lists that leave out each user's training items; every test item
is relevant (binary relevance). Events become implicit feedback: one interaction per distinct
(user, item) pair of the source's valid events.

The source is read the way ingest reads it (``source`` config: path, format, mapping, timestamp
unit), so ``NAME=quality`` runs on whatever the configuration points at; ``NAME=quality_ml100k``
is the bundled MovieLens-100k, whatever the configuration says.

Our ALS's hyperparameters are chosen by the pipeline's own sweep on a validation split carved
from the training part only (25% of each user's training items); the test split is used once, for
the final numbers. Peers keep the settings of the Microsoft Recommenders notebooks (not tuned
here): implicit's BPR and, when the ``bench`` extra is installed, cornac's BPR. The strong peer is
EASE (Steck 2019, closed form; catalogues up to ``ease.max_items``), its regularization chosen on
the same validation split as ours with the same number of trials. The popularity list is scored
too, for scale. MAP follows their definition (average precision over the top 10,
divided by the user's number of relevant items); nDCG, precision and recall match ours. Every
figure carries a 95% bootstrap interval over the test users.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from benchmarks.pipeline import cached_source, oracle_recommendations, write_source_profile
from recsys_pipeline.als import train
from recsys_pipeline.config import SAMPLE_PROFILE_PATH, AlsConfig, PipelineConfig, SweepConfig, load_config
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.evaluate import EvaluationSet, bootstrap_interval, per_user_metrics
from recsys_pipeline.events import canonicalize, read_source
from recsys_pipeline.spark import spark_session
from recsys_pipeline.state import StateLayout
from recsys_pipeline.synthetic import SyntheticSpec, SyntheticWorld
from recsys_pipeline.tuning import sweep, validation_split

SOURCE = (
    "Microsoft Recommenders README, 'Algorithm Comparison' table, MovieLens 100k, top-10, "
    "15 epochs: https://github.com/recommenders-team/recommenders#algorithm-comparison"
)
PUBLISHED: dict[str, dict[str, float]] = {
    "ALS (Spark)": {
        "map": 0.004732,
        "ndcg_at_10": 0.044239,
        "precision_at_10": 0.048462,
        "recall_at_10": 0.017796,
    },
    "BiVAE": {"map": 0.146126, "ndcg_at_10": 0.475077, "precision_at_10": 0.411771, "recall_at_10": 0.219145},
    "BPR": {"map": 0.132478, "ndcg_at_10": 0.441997, "precision_at_10": 0.388229, "recall_at_10": 0.212522},
    "FastAI": {
        "map": 0.025503,
        "ndcg_at_10": 0.147866,
        "precision_at_10": 0.130329,
        "recall_at_10": 0.053824,
    },
    "LightGCN": {
        "map": 0.088526,
        "ndcg_at_10": 0.419846,
        "precision_at_10": 0.379626,
        "recall_at_10": 0.144336,
    },
    "NCF": {"map": 0.107720, "ndcg_at_10": 0.396118, "precision_at_10": 0.347296, "recall_at_10": 0.180775},
    "SAR": {"map": 0.110591, "ndcg_at_10": 0.382461, "precision_at_10": 0.330753, "recall_at_10": 0.176385},
    "SVD": {"map": 0.012873, "ndcg_at_10": 0.095930, "precision_at_10": 0.091198, "recall_at_10": 0.032783},
}
HEADLINE = ("map", "ndcg_at_10", "precision_at_10", "recall_at_10")

PARAMS: dict[str, Any] = {
    "split": {"test_share": 0.25, "seed": 42},
    "k": 10,
    "confidence": 0.95,
    "base": {"iterations": 15, "use_cg": True, "random_state": 42},
    "sweep": {
        "strategy": "grid",
        "seed": 7,
        "validation_share": 0.25,
        "max_seconds": None,  # every candidate, whatever the machine's pace
        "space": {
            "weighting": ["bm25", "none"],
            "factors": [32, 64, 128],
            "regularization": [3, 10, 30, 100],
            "alpha": [1, 3, 10],
            "popularity_weight": [0, 0.1, 0.25, 0.5],
        },
    },
    # The Microsoft Recommenders cornac BPR notebook's settings, for both BPR implementations.
    "bpr": {"factors": 200, "iterations": 100, "learning_rate": 0.01, "regularization": 0.001, "seed": 42},
    # EASE's L2 weight, log-spaced over this range, as many values as our sweep scores.
    "ease": {"min_regularization": 1.0, "max_regularization": 10_000.0, "max_items": 20_000},
}
# A synthetic log small enough for EASE's closed form, with the default generator's taste, and a
# grid around the pipeline's defaults (EASE gets as many trials as ours scores).
SYNTHETIC_PARAMS: dict[str, Any] = PARAMS | {
    "synthetic": {"events": 1_000_000, "users": 20_000, "items": 5_000, "days": 28, "taste_strength": 3.0},
    "base": {"iterations": 15, "use_cg": True, "random_state": 42, "bm25_idf_exponent": 1.5},
    "sweep": PARAMS["sweep"]
    | {
        "space": {
            "weighting": ["bm25", "none"],
            "factors": [32, 64],
            "regularization": [3, 10, 30],
            "alpha": [1.5, 3, 10],
            "popularity_weight": [0, 0.1, 0.2, 0.3],
        }
    },
}


@dataclass(frozen=True)
class SourceMatrix:
    """A source's distinct valid (user, item) pairs as a binary matrix, and what its rows and columns
    are: ids in sorted order, numerically when every id is a number (so MovieLens ids 1..n become
    indices 0..n-1, as in the published runs)."""

    matrix: sp.csr_matrix
    dataset: dict[str, Any]
    user_ids: np.ndarray
    item_ids: np.ndarray


def source_matrix(config: PipelineConfig) -> SourceMatrix:
    """The configured source's pairs, read and validated as ingest does."""
    spark = spark_session(config, "quality-benchmark")
    events = canonicalize(
        read_source(spark, config.source), config.source, config.events, datetime.now(UTC)
    ).where("reason IS NULL")
    rows = events.count()
    pairs = events.select("user_id", "item_id").distinct().toArrow()
    users, items = sorted_ids(pairs["user_id"]), sorted_ids(pairs["item_id"])
    user_idx = pc.index_in(pairs["user_id"], users).to_numpy()
    item_idx = pc.index_in(pairs["item_id"], items).to_numpy()
    matrix = sp.csr_matrix(
        (np.ones(len(user_idx), np.float32), (user_idx, item_idx)), shape=(len(users), len(items))
    )
    dataset = {
        "name": config.source.name,
        "rows": rows,
        "users": len(users),
        "items": len(items),
        "interactions": int(matrix.nnz),
    }
    return SourceMatrix(
        matrix, dataset, users.to_numpy(zero_copy_only=False), items.to_numpy(zero_copy_only=False)
    )


def sorted_ids(ids: pa.ChunkedArray) -> pa.Array:
    unique = pc.unique(ids)
    try:
        return pc.take(unique, pc.sort_indices(unique.cast(pa.int64())))
    except pa.ArrowInvalid:
        return unique.sort()


def their_map(recommended: np.ndarray, relevant: list[np.ndarray]) -> np.ndarray:
    """Their MAP per user: sum of precision at each hit in the top k / number of relevant items."""
    values = []
    for row, rel in zip(recommended, relevant, strict=True):
        if len(rel) == 0:
            continue
        hits = np.isin(row, rel)
        precision_at_hit = np.cumsum(hits) / np.arange(1, len(row) + 1)
        values.append(float(precision_at_hit[hits].sum() / len(rel)))
    return np.asarray(values)


def headline(recommended: np.ndarray, test: EvaluationSet, k: int, confidence: float) -> dict[str, float]:
    """MAP (theirs), nDCG, precision and recall at k, each with its bootstrap interval."""
    ours = per_user_metrics(recommended, test.relevant, k)
    per_user = {
        "map": their_map(recommended[:, :k], test.relevant),
        "ndcg_at_10": ours[f"ndcg_at_{k}"],
        "precision_at_10": ours[f"precision_at_{k}"],
        "recall_at_10": ours[f"recall_at_{k}"],
    }
    metrics: dict[str, float] = {}
    for name, values in per_user.items():
        metrics[name] = float(values.mean())
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = bootstrap_interval(values, confidence)
    return metrics


def implicit_bpr(train_part: sp.csr_matrix, settings: dict[str, Any]) -> Embeddings:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(
        factors=settings["factors"],
        learning_rate=settings["learning_rate"],
        regularization=settings["regularization"],
        iterations=settings["iterations"],
        random_state=settings["seed"],
    )
    model.fit(train_part, show_progress=False)
    # Its vectors carry the item bias as one more factor (1 on the user side), so a dot product scores.
    users, items = train_part.shape
    return Embeddings(np.arange(users), model.user_factors, np.arange(items), model.item_factors)


def cornac_bpr(train_part: sp.csr_matrix, settings: dict[str, Any]) -> Embeddings:
    import cornac

    coo = train_part.tocoo()
    data = cornac.data.Dataset.from_uir(
        list(zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True)), seed=settings["seed"]
    )
    model = cornac.models.BPR(
        k=settings["factors"],
        max_iter=settings["iterations"],
        learning_rate=settings["learning_rate"],
        lambda_reg=settings["regularization"],
        seed=settings["seed"],
        verbose=False,
    )
    model.fit(data)
    # Score = user . item + item bias: append a 1 to every user vector and the bias to every item's.
    user_idx = np.fromiter(data.uid_map.keys(), dtype=np.int64)
    user_rows = np.fromiter(data.uid_map.values(), dtype=np.int64)
    item_idx = np.fromiter(data.iid_map.keys(), dtype=np.int64)
    item_rows = np.fromiter(data.iid_map.values(), dtype=np.int64)
    user_factors = np.hstack([model.u_factors[user_rows], np.ones((len(user_rows), 1))])
    item_factors = np.hstack([model.i_factors[item_rows], model.i_biases[item_rows].reshape(-1, 1)])
    return Embeddings(user_idx, user_factors.astype(np.float32), item_idx, item_factors.astype(np.float32))


def ease_weights(train_part: sp.csr_matrix, regularization: float) -> np.ndarray:
    """EASE's item-item weights (Steck 2019): B = I - P diagMat(1 / diag(P)), P = (X'X + lambda I)^-1,
    which is the least-squares fit of X by X B with a zero diagonal."""
    gram = (train_part.T @ train_part).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += regularization
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def ease_embeddings(train_part: sp.csr_matrix, weights: np.ndarray, users: np.ndarray) -> Embeddings:
    """EASE's scores X_u B as dot products: a user's vector is their row of X, an item's its column of B."""
    items = train_part.shape[1]
    return Embeddings(
        users, train_part[users].toarray().astype(np.float32), np.arange(items), weights.T.copy()
    )


def ease(
    train_part: sp.csr_matrix, test: EvaluationSet, params: dict[str, Any], trials: int
) -> tuple[Embeddings, dict[str, Any]]:
    """EASE with its regularization chosen on the validation split our sweep uses, ``trials`` values."""
    k, settings, split = params["k"], params["ease"], params["sweep"]
    fit, valid = validation_split(train_part, split["validation_share"], split["seed"])
    validation = EvaluationSet.build(fit, valid)
    binary_fit = (fit > 0).astype(np.float32)
    grid = np.geomspace(settings["min_regularization"], settings["max_regularization"], trials)
    tried = []
    for regularization in grid:
        embeddings = ease_embeddings(binary_fit, ease_weights(binary_fit, regularization), validation.users)
        tried.append((validation.evaluate(embeddings, k)[f"ndcg_at_{k}"], float(regularization)))
    best_score, best_regularization = max(tried)
    binary_train = (train_part > 0).astype(np.float32)
    chosen = ease_embeddings(binary_train, ease_weights(binary_train, best_regularization), test.users)
    return chosen, {
        "regularization": best_regularization,
        "best_validation_ndcg_at_10": best_score,
        "trials": len(tried),
    }


def peers() -> dict[str, Callable[[sp.csr_matrix, dict[str, Any]], Embeddings]]:
    """The peers that can run here: cornac is an optional extra (``pip install -e '.[bench]'``)."""
    available = {"implicit BPR": implicit_bpr}
    if importlib.util.find_spec("cornac") is not None:
        available["cornac BPR"] = cornac_bpr
    return available


Oracle = Callable[[EvaluationSet, int], np.ndarray]


def measure(source: SourceMatrix, params: dict[str, Any], oracle: Oracle | None = None) -> dict[str, Any]:
    """Ours and every peer on one split; with ``oracle`` (the test users' best possible lists, for a
    synthetic log) also the ceiling and the share of its lift over popularity ours captured."""
    k, confidence = params["k"], params["confidence"]
    matrix, dataset = source.matrix, source.dataset
    train_part, test_part = validation_split(matrix, params["split"]["test_share"], params["split"]["seed"])
    base = AlsConfig(**params["base"])
    chosen = sweep(train_part, base, SweepConfig(**params["sweep"]), k)
    embeddings, _ = train(train_part, chosen.best)
    test = EvaluationSet.build(train_part, test_part)
    recommended, catalogue_size = test.recommend(embeddings, k)
    results: dict[str, Any] = headline(recommended, test, k, confidence)
    results["coverage_at_10"] = len(np.unique(recommended)) / max(catalogue_size, 1)

    peer_results = {"popularity": headline(test.popularity_recommendations(k), test, k, confidence)}
    for name, fit in peers().items():
        peer_results[name] = headline(
            test.recommend(fit(train_part, params["bpr"]), k)[0], test, k, confidence
        )
        print(f"  {name}: ndcg_at_10 {peer_results[name]['ndcg_at_10']:.4f}", flush=True)
    if train_part.shape[1] <= params["ease"]["max_items"]:
        ease_fit, ease_choice = ease(train_part, test, params, len(chosen.trials))
        peer_results["EASE"] = headline(test.recommend(ease_fit, k)[0], test, k, confidence)
        peer_results["EASE"]["chosen"] = ease_choice
        print(f"  EASE: ndcg_at_10 {peer_results['EASE']['ndcg_at_10']:.4f} ({ease_choice})", flush=True)
    if oracle is not None:
        ceiling = headline(oracle(test, k), test, k, confidence)
        baseline = peer_results["popularity"]["ndcg_at_10"]
        results["oracle"] = ceiling
        results["lift_captured"] = (results["ndcg_at_10"] - baseline) / (ceiling["ndcg_at_10"] - baseline)
        print(
            f"  oracle: ndcg_at_10 {ceiling['ndcg_at_10']:.4f}, lift captured {results['lift_captured']:.3f}"
        )
    missing = sorted({"cornac BPR"} - set(peer_results))
    results.update(
        {
            "test_users": len(test.users),
            "dataset": dataset,
            "peers": peer_results,
            "peers_missing": [f"{name}: pip install -e '.[bench]'" for name in missing]
            + ([] if "EASE" in peer_results else [f"EASE: more than {params['ease']['max_items']} items"]),
            "best_peer": max(peer_results, key=lambda name: peer_results[name]["ndcg_at_10"]),
            "ahead_of_every_peer": all(
                results["ndcg_at_10"] >= row["ndcg_at_10"] for row in peer_results.values()
            ),
            "chosen_hyperparameters": chosen.best.hyperparameters(),
            "how_chosen": (
                f"grid sweep scoring {len(chosen.trials)} candidates, best validation {chosen.objective} on "
                f"{params['sweep']['validation_share']:.0%} of each user's training items; "
                "test split untouched"
            ),
            "best_validation_ndcg_at_10": chosen.score,
            "published": PUBLISHED,
            "published_source": SOURCE,
        }
    )
    print_table(results)
    return results


def print_table(results: dict[str, Any]) -> None:
    dataset = results["dataset"]
    print(f"  hyperparameters: {results['how_chosen']}: {results['chosen_hyperparameters']}")
    print(
        f"  measured on {dataset['name']} ({dataset['rows']} events, {dataset['users']} users, "
        f"{dataset['items']} items, {results['test_users']} test users), same split for every row:"
    )
    print(f"  {'model':<24}{'MAP':>10}{'nDCG@10':>10}{'P@10':>10}{'R@10':>10}   nDCG@10 95% CI")
    oracle = [("generator's oracle", results["oracle"])] if "oracle" in results else []
    for name, row in [("recsys-pipeline ALS", results), *results["peers"].items(), *oracle]:
        print(
            f"  {name:<24}"
            + "".join(f"{row[key]:>10.6f}" for key in HEADLINE)
            + f"   {row['ndcg_at_10_ci_low']:.3f}-{row['ndcg_at_10_ci_high']:.3f}"
        )
    print(f"  published for MovieLens-100k ({SOURCE}):")
    for name, row in PUBLISHED.items():
        print(f"  {name:<24}" + "".join(f"{row[key]:>10.6f}" for key in HEADLINE))


def run(params: dict[str, Any]) -> dict[str, Any]:
    """On the configured source (``RECSYS_CONFIG``, else the bundled sample)."""
    return measure(source_matrix(load_config()), params)


def run_bundled(params: dict[str, Any]) -> dict[str, Any]:
    """On the bundled MovieLens-100k, whatever ``RECSYS_CONFIG`` points at."""
    return measure(source_matrix(load_config(SAMPLE_PROFILE_PATH)), params)


def run_synthetic(params: dict[str, Any]) -> dict[str, Any]:
    """On a log of the project's generator (cached as the pipeline bench caches its own), read
    through a profile as a user writes one, with the generator's exact oracle as the ceiling."""
    spec = SyntheticSpec(**params["synthetic"])
    bench = StateLayout(load_config().state_home).bench
    log = cached_source(spec, bench / "data")
    profile = write_source_profile(bench / "work" / "quality_synthetic" / "pipeline.yaml", log)
    pairs = source_matrix(load_config(profile))
    world = SyntheticWorld.of(spec)

    def oracle(test: EvaluationSet, k: int) -> np.ndarray:
        return oracle_recommendations(world, pairs.user_ids, pairs.item_ids, test, k)

    return measure(pairs, params, oracle)
