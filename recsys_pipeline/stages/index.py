"""Build the run's item index (weekly) or update the champion's in place (nightly), and gate its recall."""

from __future__ import annotations

from typing import Any

from recsys_pipeline.artifacts import Gate
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir
from recsys_pipeline.index import ItemIndex, build_tuned, recall_queries, update
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext


def run_index(run: RunContext) -> dict[str, float]:
    """Build the index over the run's item vectors, measure it on real user vectors, retune if short."""
    config = run.config.index
    embeddings = run.artifacts.served.embeddings()
    queries = recall_queries(embeddings, config.recall_sample_users)
    index, metrics, curve = build_tuned(
        embeddings.item_idx, embeddings.item_factors, queries, config, run.config.evaluation.k
    )
    _save_and_gate(run, index, metrics, [point.as_dict() for point in curve])
    return metrics


def run_index_refresh(run: RunContext) -> dict[str, float]:
    """Upsert the refreshed item vectors into the index of the version the refresh folded into."""
    record = run.artifacts.refresh_record()
    if record is None:
        raise RecsysError(f"no refresh record in {run.run_dir}: run the fold-in first")
    parent_bundle = Registry(run.config).version_bundle(record.derived_from_version)
    embeddings = run.artifacts.served.embeddings()
    index, metrics = update(
        parent_bundle.index(),
        parent_bundle.embeddings(),
        embeddings,
        recall_queries(embeddings, run.config.index.recall_sample_users),
        run.config.index,
        run.config.evaluation.k,
    )
    _save_and_gate(run, index, metrics, [])
    return metrics


def _save_and_gate(
    run: RunContext, index: ItemIndex, metrics: dict[str, float], curve: list[dict[str, Any]]
) -> None:
    """Save the index, record its size, and gate its recall and its one-query latency; the gate keeps
    the measured curve the search setting was chosen from."""
    k, config = run.config.evaluation.k, run.config.index
    with atomic_dir(run.artifacts.index_dir) as staging:
        index.save(staging)
    metrics["index_mb"] = sum(path.stat().st_size for path in run.artifacts.index_dir.iterdir()) / 2**20
    recall, p99 = metrics[f"index_recall_at_{k}"], metrics["index_p99_ms"]
    reasons = []
    if recall < config.min_recall:
        reasons.append(f"index_recall_at_{k}={recall:.4f} is below index.min_recall={config.min_recall}")
    if p99 > config.max_p99_ms:
        reasons.append(f"index_p99_ms={p99:.2f} is above index.max_p99_ms={config.max_p99_ms}")
    run.artifacts.write_metrics("index", metrics)
    run.artifacts.write_gate(Gate.INDEX, not reasons, reasons, curve=curve)
