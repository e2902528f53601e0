"""Validate what the run read and produced (GX suites, drift against the champion); log a rejected run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recsys_pipeline import drift
from recsys_pipeline.artifacts import Gate
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.events import ingest_window
from recsys_pipeline.files import atomic_dir, write_json
from recsys_pipeline.registry import Registry, VersionTags
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.publish import log_rejected_run
from recsys_pipeline.tables import Triples
from recsys_pipeline.validation import (
    ValidationFailedError,
    cold_embeddings_suite,
    compare_with_popular,
    content_summary_suite,
    drift_summary_suite,
    embedding_profile,
    embeddings_suite,
    events_suite,
    events_volume_suite,
    ingest_summary_suite,
    interaction_profile,
    interaction_profile_suite,
    interactions_suite,
    item_drift_suite,
    recommendations_suite,
    recommendations_summary,
    recommendations_summary_suite,
    validate_frames,
)


def champion_rows(run: RunContext, registry: Registry) -> float | None:
    """How many events the reference version's weekly run (the champion, or the champion of the run's
    own time) had in its window: the reference for a full run's row-count band.

    A refresh ingests one day, so it has no comparable reference (None: no band).
    """
    if run.mode == "refresh":
        return None
    reference = registry.run_reference(run)
    if reference is None:
        return None
    lineage = VersionTags.of(reference).lineage
    weekly = str(reference.version) if lineage is None else lineage.parent_version
    return registry.version_status(weekly)["metrics"].get("window_events")


def drift_against_champion(
    run: RunContext, registry: Registry, embeddings: Embeddings
) -> drift.DriftReport | None:
    """Drift of this run's vectors against the champion's; None when there is no champion yet.

    A refresh whose champion is still its weekly parent compared these same two models in its fold-in:
    that report is taken as it is.
    """
    reference = registry.run_reference(run)
    if reference is None:
        return None
    version, rules = str(reference.version), run.config.drift
    report = drift.read_report(run.artifacts.parent_drift_dir, version, rules)
    if report is None:
        champion = registry.version_bundle(version).embeddings()
        report = drift.compare(champion, embeddings, rules.k, rules.sample_items, rules.sample_users)
    run.artifacts.write_metrics("drift", report.metrics)
    return report


def lake_sample(run: RunContext) -> tuple[pd.DataFrame, int]:
    """(a seeded sample of at most ``validation.sample_rows`` of the window's events, their exact count).

    Only the sample becomes a DataFrame: the window may hold hundreds of millions of events.
    """
    start, end = ingest_window(run)
    window = (ds.field("event_ts") >= start) & (ds.field("event_ts") < end)
    with run.layout.lock(shared=True):
        dataset = ds.dataset(str(run.layout.events_lake), format="parquet", partitioning="hive")
        rows = dataset.count_rows(filter=window)
        picked = sample_positions(rows, run.config.validation.sample_rows)
        table = dataset.take(picked, filter=window) if len(picked) else dataset.head(0, filter=window)
    return table.to_pandas(), rows


def sample_positions(rows: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted, seeded positions of at most ``size`` of ``rows`` rows (all of them when fewer)."""
    if rows <= size:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))


def run_validation(run: RunContext) -> dict[str, float]:
    """Validate the run's events, interactions and embeddings; raise naming every failure."""
    config = run.config
    registry = Registry(config)
    n_users, n_items = run.artifacts.interactions.matrix_shape()
    embeddings = run.artifacts.served.embeddings()
    learned = embeddings.warm_items()
    window_start, window_end = ingest_window(run)
    sample_rows = config.validation.sample_rows
    train = run.artifacts.interactions.train_matrix()
    pairs = Triples.of_csr(train)
    picked = sample_positions(pairs.nnz, sample_rows)
    train_sample = pd.DataFrame(
        {
            "user_idx": pairs.user_idx[picked],
            "item_idx": pairs.item_idx[picked],
            "confidence": pairs.confidence[picked],
        }
    )
    events, event_count = lake_sample(run)
    frames: dict[str, tuple[pd.DataFrame, list[Any]]] = {
        "events": (events, events_suite(config, pd.Timestamp(window_start), pd.Timestamp(window_end))),
        "events_volume": (
            pd.DataFrame({"rows": [event_count]}),
            events_volume_suite(config, champion_rows(run, registry)),
        ),
        "ingest_summary": (
            pd.DataFrame([run.artifacts.read_metrics()]).reindex(columns=["quarantine_share"]),
            ingest_summary_suite(config),
        ),
        "interactions": (train_sample, interactions_suite(n_users, n_items)),
        "interaction_profile": (
            interaction_profile(pairs.user_idx, pairs.item_idx),
            interaction_profile_suite(config),
        ),
        "item_embeddings": (
            embedding_profile(learned.item_idx, learned.learned().item_factors),
            embeddings_suite(config, n_items, len(learned.item_idx)),
        ),
    }
    cold = ~np.isin(embeddings.item_idx, learned.item_idx)
    if cold.any():
        frames["cold_item_embeddings"] = (
            embedding_profile(embeddings.item_idx[cold], embeddings.learned().item_factors[cold]),
            cold_embeddings_suite(n_items, int(cold.sum())),
        )
    recorded = run.artifacts.read_metrics()
    if "content_map_r2" in recorded:
        frames["content_summary"] = (
            pd.DataFrame([{name: recorded[name] for name in ("content_coverage", "content_map_r2")}]),
            content_summary_suite(config),
        )
    if run.artifacts.recommendations_file.is_file():
        # Lists are written user by user: the first rows hold whole lists of the first users.
        recommendations = pq.ParquetFile(run.artifacts.recommendations_file)
        head = next(recommendations.iter_batches(batch_size=sample_rows), None)
        frames["recommendations"] = (
            head.to_pandas() if head is not None else recommendations.schema_arrow.empty_table().to_pandas(),
            recommendations_suite(config),
        )
        # What the lists exclude, as batch_recommend has it, for the listed users.
        user_ids = run.artifacts.interactions.ids("users")
        listed = np.zeros(n_users, dtype=bool)
        if head is not None:
            found = pc.index_in(head.column("user_id"), value_set=pa.array(user_ids, pa.string()))
            listed[found.drop_null().to_numpy()] = True
        seen = run.artifacts.interactions.seen_matrix(train, listed)
        popular = compare_with_popular(
            frames["recommendations"][0],
            user_ids,
            run.artifacts.interactions.ids("items"),
            np.bincount(train.indices, minlength=n_items),
            seen,
        )
        frames["recommendations_summary"] = (
            recommendations_summary(frames["recommendations"][0], run.artifacts.read_metrics(), popular),
            recommendations_summary_suite(config, popular),
        )
    report = drift_against_champion(run, registry, embeddings)
    if report is not None:
        frames["item_drift"] = (report.items, item_drift_suite(config))
        frames["drift_summary"] = (pd.DataFrame([report.metrics]), drift_summary_suite(config))
    with atomic_dir(run.artifacts.validation_dir) as staging:
        staging.mkdir(parents=True)
        if report is not None:
            report.items.to_parquet(staging / "item_drift.parquet")
            drift.plot(report, staging / "drift.png")
        failures = validate_frames(staging, frames)
        write_json(staging / "failures.json", [str(f) for f in failures])
    metrics = {"validation_failures": float(len(failures)), "validation_suites": float(len(frames))}
    run.artifacts.write_metrics("validate", metrics)
    run.artifacts.write_gate(Gate.VALIDATION, not failures, [str(f) for f in failures])
    if failures:
        message = "; ".join(str(f) for f in failures)
        log_rejected_run(run, message)
        raise ValidationFailedError(message)
    return metrics
