"""Nightly refresh: fold new activity into the champion's model without a full retrain.

Item factors stay fixed while users with new activity (and users new since the weekly run)
are re-solved from their *whole* history; new items are solved from their users with user
factors fixed. Both are implicit's own least-squares updates (``partial_fit_items``,
``partial_fit_users``), so a folded-in vector is exactly the ALS solution for its row.

The refreshed model escalates to a full retrain when it no longer resembles its weekly
parent (drift beyond the ``drift:`` bounds), when too much of the catalogue is new, or when
the weekly parent is too old. Outputs under ``<run_dir>``::

    model/             the refreshed embeddings, in the same layout as a trained model
    refresh/refresh.json   lineage, counts, time and the escalation decision
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_pipeline import drift
from recsys_pipeline.als import (
    Embeddings,
    check_finite,
    implicit_loss,
    matrix_shape,
    read_embeddings,
    write_embeddings,
)
from recsys_pipeline.config import AlsConfig, PipelineConfig, RefreshConfig
from recsys_pipeline.runs import RunContext, atomic_dir, parse_instant, write_json
from recsys_pipeline.tables import read_indices, read_matrix

log = logging.getLogger(__name__)
FULL_RETRAIN, CONTINUE = "trigger_full_retrain", "update_index"


def fold_in(
    parent: Embeddings,
    user_items: sp.csr_matrix,
    users: np.ndarray,
    new_items: np.ndarray,
    params: AlsConfig,
    config: RefreshConfig,
) -> Embeddings:
    """Solve ``new_items`` (users fixed), then ``users`` (items fixed) on the full ``user_items``."""
    from implicit.cpu import _als
    from implicit.cpu.als import AlternatingLeastSquares

    n_users, n_items = user_items.shape
    threads = os.cpu_count() or 0
    model = AlternatingLeastSquares(
        factors=parent.user_factors.shape[1],
        regularization=params.regularization,
        alpha=params.alpha,
        num_threads=threads,
    )
    model.user_factors = parent.dense_users(n_users)
    model.item_factors = parent.dense_items(n_items)
    user_items = user_items.astype(np.float32).tocsr()
    with threadpool_limits(limits=1, user_api="blas"):
        if len(new_items):
            model.partial_fit_items(new_items, user_items.T.tocsr()[new_items])
        if len(users) and config.solver == "cholesky":
            model.partial_fit_users(users, user_items[users])
        elif len(users):
            # Warm start from the parent's vector (zero for a new user); implicit's CG solver in place.
            vectors = np.ascontiguousarray(model.user_factors[users])
            confidence = (params.alpha * user_items[users]).astype(np.float32).tocsr()
            _als.least_squares_cg(
                confidence,
                vectors,
                model.item_factors,
                params.regularization,
                num_threads=threads,
                cg_steps=config.cg_steps,
            )
            model.user_factors[users] = vectors
    user_idx = np.union1d(parent.user_idx, users)
    item_idx = np.union1d(parent.item_idx, new_items)
    return Embeddings(user_idx, model.user_factors[user_idx], item_idx, model.item_factors[item_idx])


def rows_to_refresh(
    user_items: sp.csr_matrix, parent: Embeddings, recent_users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(users to re-solve, items to add): active users plus any user or item with data but no vector."""
    with_data_users = np.flatnonzero(np.diff(user_items.indptr) > 0)
    with_data_items = np.flatnonzero(user_items.getnnz(axis=0) > 0)
    users = np.union1d(
        np.intersect1d(recent_users, with_data_users), np.setdiff1d(with_data_users, parent.user_idx)
    )
    return users, np.setdiff1d(with_data_items, parent.item_idx)


def escalation_reasons(
    *,
    new_items: int,
    catalogue_items: int,
    parent_data_end: datetime,
    run_end: datetime,
    drift_metrics: dict[str, float] | None,
    run_config: PipelineConfig,
) -> list[str]:
    """Why the refresh must give way to a full retrain (empty: it need not)."""
    config = run_config.refresh
    reasons = []
    share = new_items / max(catalogue_items, 1)
    if share > config.max_new_item_share:
        reasons.append(
            f"{new_items} new items are {share:.1%} of the catalogue, above "
            f"refresh.max_new_item_share={config.max_new_item_share:.1%}"
        )
    age_days = (run_end - parent_data_end).total_seconds() / 86_400
    if age_days > config.max_parent_age_days:
        reasons.append(
            f"the weekly parent's data ends {age_days:.1f} days before this run's, above "
            f"refresh.max_parent_age_days={config.max_parent_age_days}"
        )
    if drift_metrics is not None:
        reasons.extend(
            f"drift from the weekly parent: {v}" for v in drift.violations(drift_metrics, run_config.drift)
        )
    return reasons


def _trained_params(embeddings_dir: Path, fallback: AlsConfig) -> AlsConfig:
    path = embeddings_dir / "params.json"
    if not path.is_file():
        return fallback
    recorded = json.loads(path.read_text())
    return fallback.with_params({name: recorded[name] for name in fallback.hyperparameters()}).model_copy(
        update={"backend": recorded.get("backend", fallback.backend)}
    )


def run_refresh(run: RunContext) -> dict[str, Any]:
    """Fold the run's history into the champion, record lineage and decide whether to escalate."""
    from recsys_pipeline.publish import download_bundle, version_bundle, version_status

    config = run.config
    champion, champion_bundle = download_bundle(config)
    champion_tags = dict(champion.tags)
    if champion_tags.get("kind") == "refresh":
        weekly_version = champion_tags["parent_version"]
        weekly_bundle = version_bundle(config, weekly_version)
        weekly_tags = version_status(config, weekly_version)["tags"]
    else:
        weekly_version, weekly_bundle, weekly_tags = str(champion.version), champion_bundle, champion_tags
    parent = read_embeddings(champion_bundle / "embeddings")
    params = _trained_params(champion_bundle / "embeddings", config.als)

    interactions_dir = run.stage_dir("interactions")
    user_items = read_matrix(interactions_dir / "train").to_csr(*matrix_shape(interactions_dir))
    recent = read_indices(interactions_dir / "recent" / "users")
    users, new_items = rows_to_refresh(user_items, parent, recent)
    started = time.perf_counter()
    refreshed = fold_in(parent, user_items, users, new_items, params, config.refresh)
    refresh_s = time.perf_counter() - started
    check_finite(refreshed.user_factors, refreshed.item_factors, "the fold-in")

    weekly = parent if weekly_bundle == champion_bundle else read_embeddings(weekly_bundle / "embeddings")
    rules = config.drift
    drift_metrics = drift.compare(weekly, refreshed, rules.k, rules.sample_items, rules.sample_users).metrics
    reasons = escalation_reasons(
        new_items=len(new_items),
        catalogue_items=len(refreshed.item_idx),
        parent_data_end=parse_instant(weekly_tags["data_interval_end"]),
        run_end=run.interval_end,
        drift_metrics=drift_metrics,
        run_config=config,
    )
    users_added = int(np.isin(users, parent.user_idx, invert=True).sum())
    record = {
        "parent_version": weekly_version,
        "derived_from_version": str(champion.version),
        "refresh_day": run.interval_start.date().isoformat(),
        "users_updated": len(users) - users_added,
        "users_added": users_added,
        "items_added": len(new_items),
        "refresh_s": round(refresh_s, 4),
        "solver": config.refresh.solver,
        "escalate": bool(reasons),
        "reasons": reasons,
    }
    with atomic_dir(run.stage_dir("model")) as staging:
        write_embeddings(staging, refreshed)
        dense_users, dense_items = (
            refreshed.dense_users(user_items.shape[0]),
            refreshed.dense_items(user_items.shape[1]),
        )
        write_json(
            staging / "training_loss.json", [implicit_loss(user_items, dense_users, dense_items, params)]
        )
        write_json(staging / "params.json", {"backend": params.backend, **params.hyperparameters()})
    with atomic_dir(run.stage_dir("refresh")) as staging:
        write_json(staging / "refresh.json", record)
    run.write_metrics(
        "refresh",
        {
            "refresh_s": refresh_s,
            "refresh_users_updated": float(record["users_updated"]),
            "refresh_users_added": float(users_added),
            "refresh_items_added": float(len(new_items)),
            **{f"refresh_{name}": value for name, value in drift_metrics.items()},
        },
    )
    run.write_gate("refresh", not reasons, reasons)
    if reasons:
        log.warning("refresh escalates to a full retrain: %s", "; ".join(reasons))
    log.info("refresh: %s", json.dumps(record))
    return record


def next_step(run: RunContext) -> str:
    """The nightly DAG's branch: update the index, or trigger a full retrain when the refresh escalated."""
    record = json.loads((run.stage_dir("refresh") / "refresh.json").read_text())
    return FULL_RETRAIN if record["escalate"] else CONTINUE


def run_index_refresh(run: RunContext) -> dict[str, float]:
    """Update the index of the version this refresh derives from (see :func:`index.update_index`)."""
    from recsys_pipeline.index import update_index
    from recsys_pipeline.publish import version_bundle

    record = json.loads((run.stage_dir("refresh") / "refresh.json").read_text())
    return update_index(run, version_bundle(run.config, record["derived_from_version"]))
