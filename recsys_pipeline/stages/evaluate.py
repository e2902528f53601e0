"""Evaluate the run's model, the popularity baseline and the champion on the run's holdout."""

from __future__ import annotations

import logging

import numpy as np

from recsys_pipeline.artifacts import Gate
from recsys_pipeline.evaluate import EvaluationSet, gate, sampled_users, scores
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext

log = logging.getLogger(__name__)


def run_evaluation(run: RunContext) -> dict[str, float]:
    """Metrics of the candidate, ``baseline_*`` of popularity and ``champion_*`` of the champion (if any),
    all on the same users; writes the evaluation gate. A run of a window older than the champion's
    data is compared with the champion of its own time, the version the run pinned
    (:func:`~recsys_pipeline.registry.run_reference`).

    Candidate and champion are scored on their learned vectors: cold items' content vectors are
    judged by the content map's fit and the ``cold_start`` benchmark, and two versions' cold sets
    differ, which would make the comparison unlike for like.
    """
    reference = Registry(run.config).reference_bundle(run)
    if reference is not None:
        run.artifacts.interactions.check_maps_extend(reference[1], reference[0])
    settings = run.config.evaluation
    holdout = run.artifacts.interactions.holdout_matrix()
    users = sampled_users(holdout, settings.max_users, settings.sample_seed)
    train = run.artifacts.interactions.train_matrix()
    evaluation = EvaluationSet.of_users(
        users, train, holdout, np.bincount(train.indices, minlength=holdout.shape[1])
    )
    k, confidence = settings.k, settings.confidence
    served = run.artifacts.served.embeddings().warm_items()
    recommended, catalogue_size = evaluation.recommend(served, k)
    candidate = scores(recommended, evaluation.relevant, k, catalogue_size)
    baseline = evaluation.popularity_scores(k)
    metrics = candidate.summary(confidence) | baseline.summary(confidence, "baseline_")
    champion_scores = candidate_vs_champion = None
    if reference is not None:
        # A user's last pairs are held out whole, earlier events included, and an older champion
        # trained on those events: on 20M events 13.5% of the week after's holdout pairs, worth
        # +0.008 nDCG@10 to it. Both are compared on the pairs the champion never trained on.
        unseen = evaluation.without(*reference[1].history())
        champion_scores = unseen.scores(reference[1].embeddings().warm_items(), k)
        # The same users with the same seen items: the candidate's lists are the ones scored above.
        candidate_vs_champion = scores(recommended, unseen.relevant, k, catalogue_size)
        metrics.update(champion_scores.summary(confidence, "champion_"))
        metrics[f"candidate_vs_champion_ndcg_at_{k}"] = float(
            candidate_vs_champion.per_user[f"ndcg_at_{k}"].mean()
        )
        metrics["reference_version"] = float(reference[0])
    metrics["eval_users"] = float(candidate.users)
    metrics["eval_holdout_users"] = float((holdout.getnnz(axis=1) > 0).sum())
    metrics["eval_users_sampled"] = float(len(evaluation.users))
    passed, reasons, figures = gate(
        candidate, baseline, champion_scores, settings.gate, confidence, candidate_vs_champion
    )
    metrics.update(figures)
    run.artifacts.write_metrics("evaluate", metrics)
    run.artifacts.write_gate(Gate.EVALUATION, passed, reasons)
    log.info("evaluation gate %s %s", "passed" if passed else "failed", reasons)
    return metrics
