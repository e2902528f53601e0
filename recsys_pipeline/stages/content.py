"""Take in item metadata, and give items without a learned vector a content vector in the factor space."""

from __future__ import annotations

import logging
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_pipeline.artifacts import ContentFiles
from recsys_pipeline.content import (
    ITEM_ID,
    ContentError,
    check_coverage,
    check_map_fit,
    check_quarantine_share,
    encode_items,
    fit_content_map,
    read_metadata,
    with_content_vectors,
)
from recsys_pipeline.embeddings import write_factors
from recsys_pipeline.events import lake_partitions
from recsys_pipeline.files import atomic_dir, write_json
from recsys_pipeline.runs import RunContext
from recsys_pipeline.tables import distinct_values

log = logging.getLogger(__name__)
ITEMS_FILE = "items.parquet"


def run_item_ingest(run: RunContext) -> dict[str, float]:
    """Replace the lake's item metadata with the content source's accepted rows; quarantine the rest.

    Runs as soon as the events are in the lake: metadata that names too few of the items the events
    name fails the run here, before anything is trained (not at ``content``, after training)."""
    config = run.config.content
    if not config.enabled or config.source is None:
        log.info("content.enabled is false: no item metadata to take in")
        return {}
    read = read_metadata(config.source)
    with atomic_dir(run.items_quarantine_dir) as staging:
        staging.mkdir(parents=True)
        pq.write_table(read.quarantine, staging / "quarantine.parquet")
    run.artifacts.write_metrics("items", read.metrics)
    check_quarantine_share(read.metrics, config.max_quarantine_share)
    # The events' items up to the run's end: what the catalogue will be drawn from.
    last_day = (run.interval_end - timedelta(microseconds=1)).date()
    with run.layout.lock(shared=True):
        days = [path for day, path in lake_partitions(run.layout.events_lake).items() if day <= last_day]
        catalogue = distinct_values(days, "item_id")
    named = int(pc.sum(pc.is_in(catalogue, value_set=read.items.column(ITEM_ID))).as_py() or 0)
    check_coverage(named, len(catalogue), config)
    with run.layout.lock(), atomic_dir(run.layout.items_lake) as staging:
        staging.mkdir(parents=True)
        pq.write_table(read.items, staging / ITEMS_FILE)
    return read.metrics


def run_content(run: RunContext) -> dict[str, float]:
    """Encode every item's metadata, fit the map from content to the trained item factors on warm items,
    and write the served model: the learned vectors plus mapped ones (flagged cold) for the items
    without one, blended for sparse items when ``content.hybrid_half_count`` is set."""
    config = run.config.content
    if not config.enabled:
        log.info("content.enabled is false: items without a learned vector stay without one")
        return {}
    items_file = run.layout.items_lake / ITEMS_FILE
    if not items_file.is_file():
        raise ContentError(f"no item metadata in {items_file}: run the ingest_items task first")
    with run.layout.lock(shared=True):
        items = pq.read_table(items_file)
    catalogue = run.artifacts.interactions.ids("items")
    positions = pc.index_in(items.column(ITEM_ID), value_set=pa.array(catalogue, pa.string()))
    known = np.asarray(pc.is_valid(positions))
    items, item_idx = items.filter(pa.array(known)), positions.drop_null().to_numpy().astype(np.int64)
    check_coverage(len(item_idx), len(catalogue), config)
    rows, vectors = encode_items(items, config)
    content_idx = item_idx[rows]

    trained = run.artifacts.trained
    learned = trained.embeddings()
    has_both = np.isin(content_idx, learned.item_idx)
    factor_rows = learned.item_rows(content_idx[has_both])
    content_map = fit_content_map(vectors[has_both], learned.learned().item_factors[factor_rows], config.map)
    check_map_fit(content_map, config.map.min_r2)
    mapped = content_map.apply(vectors)
    counts = np.bincount(run.artifacts.interactions.train_matrix().indices, minlength=len(catalogue))
    served = with_content_vectors(learned, content_idx, mapped, counts, config.hybrid_half_count)

    with atomic_dir(run.artifacts.content.root) as staging:
        staging.mkdir(parents=True)
        written = ContentFiles(staging, run.config.als)
        write_factors(written.vectors_file, content_idx, vectors)
        write_factors(written.map_weights_file, np.arange(len(content_map.weights)), content_map.weights)
        write_json(
            written.map_record_file,
            {
                "content_mean": content_map.content_mean.tolist(),
                "bias": content_map.bias.tolist(),
                "encoder": config.encoder,
                **content_map.metrics,
            },
        )
        trained.copy_to(written.served, served)
    metrics = {
        **content_map.metrics,
        "content_items": float(len(content_idx)),
        "content_items_unknown": float((~known).sum()),
        "content_coverage": len(content_idx) / max(len(catalogue), 1),
        "cold_items": float(len(served.cold_item_idx)),
    }
    run.artifacts.write_metrics("content", metrics)
    return metrics
