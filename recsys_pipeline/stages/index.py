"""Build the run's item index (weekly) or update the champion's in place (nightly), and gate its recall."""

from __future__ import annotations

from recsys_pipeline.errors import RecsysError
from recsys_pipeline.index import ItemIndex, build_tuned, recall_queries, update
from recsys_pipeline.registry import version_bundle
from recsys_pipeline.runs import RunContext, atomic_dir


def run_index(run: RunContext) -> dict[str, float]:
    """Build the index over the run's item vectors, measure it on real user vectors, retune if short."""
    config = run.config.index
    embeddings = run.embeddings()
    queries = recall_queries(embeddings, config.recall_sample_users)
    index, metrics = build_tuned(
        embeddings.item_idx, embeddings.item_factors, queries, config, run.config.evaluation.k
    )
    _save_and_gate(run, index, metrics)
    return metrics


def run_index_refresh(run: RunContext) -> dict[str, float]:
    """Upsert the refreshed item vectors into the index of the version the refresh folded into."""
    record = run.refresh_record()
    if record is None:
        raise RecsysError(f"no refresh record in {run.run_dir}: run the fold-in first")
    parent_bundle = version_bundle(run.config, record.derived_from_version)
    embeddings = run.embeddings()
    index, metrics = update(
        parent_bundle.index(),
        parent_bundle.embeddings(),
        embeddings,
        recall_queries(embeddings, run.config.index.recall_sample_users),
        run.config.index,
        run.config.evaluation.k,
    )
    _save_and_gate(run, index, metrics)
    return metrics


def _save_and_gate(run: RunContext, index: ItemIndex, metrics: dict[str, float]) -> None:
    k, min_recall = run.config.evaluation.k, run.config.index.min_recall
    with atomic_dir(run.index_dir) as staging:
        index.save(staging)
    recall = metrics[f"index_recall_at_{k}"]
    passed = recall >= min_recall
    reasons = [] if passed else [f"index_recall_at_{k}={recall:.4f} is below index.min_recall={min_recall}"]
    run.write_metrics("index", metrics)
    run.write_gate("index", passed, reasons)
