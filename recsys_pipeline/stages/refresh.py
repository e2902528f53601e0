"""Fold the run's history into the champion of its time (nightly), record lineage and decide whether
to escalate."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import numpy as np

from recsys_pipeline import drift
from recsys_pipeline.als import check_finite, extended_item_weights, implicit_loss, weighted
from recsys_pipeline.artifacts import Gate, RefreshRecord
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir
from recsys_pipeline.refresh import escalation_reasons, fold_in, rows_to_refresh
from recsys_pipeline.registry import NothingPublishedError, Registry, VersionTags
from recsys_pipeline.runs import RunContext

log = logging.getLogger(__name__)


def run_refresh(run: RunContext) -> RefreshRecord:
    """Refresh the vectors of the champion of the run's time with the run's history; write the model,
    the record and the gate. That version is the run's :func:`~recsys_pipeline.registry.run_reference`: the
    live champion, or in a replay the version its earlier runs would have promoted."""
    config = run.config
    registry = Registry(config)
    champion = registry.run_reference(run)
    if champion is None:
        raise NothingPublishedError(
            f"no version of {config.mlflow.model_name} to fold {run.interval_key} into: none is champion "
            "with data no newer than this run's (nor, in a dry run or a replay, passed every gate): run "
            "the weekly DAG for this date first"
        )
    champion_bundle = registry.version_bundle(str(champion.version))
    run.artifacts.interactions.check_maps_extend(champion_bundle, str(champion.version))
    champion_tags = VersionTags.of(champion)
    if champion_tags.lineage is not None:
        weekly_version = champion_tags.lineage.parent_version
        weekly = registry.version_bundle(weekly_version).embeddings()
        weekly_tags = VersionTags.of(registry.version(weekly_version))
    else:
        weekly_version, weekly, weekly_tags = str(champion.version), None, champion_tags
    parent = champion_bundle.embeddings()
    weekly = weekly if weekly is not None else parent
    params = champion_bundle.trained_params(config.als)

    user_items = run.artifacts.interactions.train_matrix()
    users, new_items = rows_to_refresh(user_items, parent, run.artifacts.interactions.recent("users"))
    started = time.perf_counter()
    weights = extended_item_weights(
        champion_bundle.item_weights(), parent.warm_items().item_idx, user_items, params
    )
    refreshed = fold_in(parent, user_items, users, new_items, params, config.refresh, weights)
    refresh_s = time.perf_counter() - started
    check_finite(refreshed.user_factors, refreshed.item_factors, "the fold-in")

    rules = config.drift
    parent_drift = drift.compare(weekly, refreshed, rules.k, rules.sample_items, rules.sample_users)
    with atomic_dir(run.artifacts.parent_drift_dir) as staging:
        drift.write_report(parent_drift, staging, weekly_version, rules)
    drift_metrics = parent_drift.metrics
    reasons = escalation_reasons(
        new_items=len(new_items),
        catalogue_items=len(refreshed.item_idx),
        parent_data_end=weekly_tags.data_interval_end,
        run_end=run.interval_end,
        drift_metrics=drift_metrics,
        run_config=config,
    )
    users_added = int(np.isin(users, parent.user_idx, invert=True).sum())
    record = RefreshRecord(
        parent_version=weekly_version,
        derived_from_version=str(champion.version),
        refresh_day=run.interval_start.date().isoformat(),
        users_updated=len(users) - users_added,
        users_added=users_added,
        items_added=len(new_items),
        refresh_s=round(refresh_s, 4),
        solver=config.refresh.solver,
        escalate=bool(reasons),
        reasons=reasons,
    )
    n_users, n_items = user_items.shape
    loss = implicit_loss(
        weighted(user_items, params, weights),
        refreshed.dense_users(n_users),
        refreshed.dense_items(n_items),
        params,
    )
    run.artifacts.write_trained(refreshed, [loss], params, weights, champion_bundle.sweep_summary())
    run.artifacts.write_refresh_record(record)
    run.artifacts.write_metrics(
        "refresh",
        {
            "refresh_s": refresh_s,
            "refresh_users_updated": float(record.users_updated),
            "refresh_users_added": float(users_added),
            "refresh_items_added": float(len(new_items)),
            "cold_items": float(len(refreshed.cold_item_idx)),
            **{f"refresh_{name}": value for name, value in drift_metrics.items()},
        },
    )
    run.artifacts.write_gate(Gate.REFRESH, not reasons, reasons)
    if reasons:
        log.warning("refresh escalates to a full retrain: %s", "; ".join(reasons))
    log.info("refresh: %s", json.dumps(asdict(record)))
    return record


def refresh_escalated(run: RunContext) -> bool:
    """Whether the run's refresh decided a full retrain must replace it."""
    record = run.artifacts.refresh_record()
    if record is None:
        raise RecsysError(f"no refresh record in {run.run_dir}: run the fold-in first")
    return record.escalate
