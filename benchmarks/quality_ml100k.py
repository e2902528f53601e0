"""MovieLens-100k under the Microsoft Recommenders protocol, beside their published table.

Protocol (as in their benchmark notebook): a per-user stratified random split, 75% train /
25% test, seed 42; top-10 lists that leave out each user's training items; every test item
is relevant (binary relevance). Ratings become implicit feedback (confidence 1 each).

Hyperparameters are chosen by the pipeline's own sweep on a validation split carved from
the training part only (25% of each user's training items); the test split is used once,
for the final numbers. MAP follows their definition (average precision over the top 10,
divided by the user's number of relevant items); nDCG, precision and recall match ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_pipeline.als import train
from recsys_pipeline.config import AlsConfig, SweepConfig, load_config
from recsys_pipeline.evaluate import EvaluationSet, ranking_metrics
from recsys_pipeline.tuning import sweep, validation_split

SOURCE = (
    "Microsoft Recommenders README, 'Algorithms' benchmark table, MovieLens 100k, top-10, "
    "15 epochs: https://github.com/recommenders-team/recommenders#benchmarks"
)
PUBLISHED: dict[str, dict[str, float]] = {
    "ALS (Spark)": {
        "map": 0.004732,
        "ndcg_at_10": 0.044239,
        "precision_at_10": 0.048462,
        "recall_at_10": 0.017796,
    },
    "SVD": {"map": 0.012873, "ndcg_at_10": 0.095930, "precision_at_10": 0.091198, "recall_at_10": 0.032783},
    "FastAI": {
        "map": 0.025503,
        "ndcg_at_10": 0.147866,
        "precision_at_10": 0.130329,
        "recall_at_10": 0.053824,
    },
    "SAR": {"map": 0.113028, "ndcg_at_10": 0.388321, "precision_at_10": 0.333828, "recall_at_10": 0.183179},
    "BPR": {"map": 0.105365, "ndcg_at_10": 0.389948, "precision_at_10": 0.349841, "recall_at_10": 0.181807},
    "NCF": {"map": 0.107720, "ndcg_at_10": 0.396118, "precision_at_10": 0.347296, "recall_at_10": 0.180775},
}

PARAMS: dict[str, Any] = {
    "split": {"test_share": 0.25, "seed": 42},
    "k": 10,
    "base": {"iterations": 15, "use_cg": True, "random_state": 42},
    "sweep": {
        "strategy": "grid",
        "seed": 7,
        "validation_share": 0.25,
        "space": {"factors": [32, 64, 128], "regularization": [3, 10, 30, 100], "alpha": [1, 3, 10]},
    },
}


def movielens_matrix() -> sp.csr_matrix:
    ratings = pd.read_csv(
        load_config().source.path, sep="\t", names=["user", "item", "rating", "ts"], usecols=[0, 1]
    )
    return sp.csr_matrix(
        (np.ones(len(ratings), np.float32), (ratings.user - 1, ratings.item - 1)),
        shape=(ratings.user.max(), ratings.item.max()),
    )


def peer_map(recommended: np.ndarray, relevant: list[np.ndarray]) -> float:
    """Their MAP: sum of precision at each hit in the top k / number of relevant items."""
    total = 0.0
    for row, rel in zip(recommended, relevant, strict=True):
        hits = np.isin(row, rel)
        precision_at_hit = np.cumsum(hits) / np.arange(1, len(row) + 1)
        total += float(precision_at_hit[hits].sum() / len(rel))
    return total / len(relevant)


def run(params: dict[str, Any]) -> dict[str, Any]:
    k = params["k"]
    ratings = movielens_matrix()
    train_part, test_part = validation_split(ratings, params["split"]["test_share"], params["split"]["seed"])
    base = AlsConfig(**params["base"])
    chosen = sweep(train_part, base, SweepConfig(**params["sweep"]), k)
    embeddings, _ = train(train_part, chosen.best)
    test = EvaluationSet.build(train_part, test_part)
    recommended, catalogue_size = test.recommend(embeddings, k)
    ours = ranking_metrics(recommended, test.relevant, k, catalogue_size, confidence=0.95)
    results = {
        "map": peer_map(recommended, test.relevant),
        "ndcg_at_10": ours[f"ndcg_at_{k}"],
        "precision_at_10": ours[f"precision_at_{k}"],
        "recall_at_10": ours[f"recall_at_{k}"],
        "map_at_10": ours[f"map_at_{k}"],
        "coverage_at_10": ours[f"coverage_at_{k}"],
        # 95% bootstrap intervals over the test users, to read the comparison with the table against.
        **{
            f"{name}_at_10_ci_{side}": ours[f"{name}_at_{k}_ci_{side}"]
            for name in ("ndcg", "precision", "recall", "map")
            for side in ("low", "high")
        },
        "test_users": len(test.users),
        "chosen_hyperparameters": chosen.best.hyperparameters(),
        "how_chosen": (
            f"grid sweep of {len(chosen.trials)} candidates, best validation {chosen.objective} on "
            f"{params['sweep']['validation_share']:.0%} of each user's training items; test split untouched"
        ),
        "best_validation_ndcg_at_10": chosen.score,
        "published": PUBLISHED,
        "published_source": SOURCE,
    }
    print(f"  hyperparameters: {results['how_chosen']}: {results['chosen_hyperparameters']}")
    print(f"  {'model':<22}{'MAP':>10}{'nDCG@10':>10}{'P@10':>10}{'R@10':>10}    (source: {SOURCE})")
    for name, row in [*PUBLISHED.items(), ("recsys-pipeline ALS", results)]:
        print(
            f"  {name:<22}{row['map']:>10.6f}{row['ndcg_at_10']:>10.6f}"
            f"{row['precision_at_10']:>10.6f}{row['recall_at_10']:>10.6f}"
        )
    return results
