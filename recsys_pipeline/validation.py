"""Great Expectations suites over what a run read and produced, run as one checkpoint per suite.

:func:`validate_frames` runs them in a file-backed GX project (the validate stage puts it
under the run's ``validation/gx``), so suites, results and Data Docs travel with the run
and into the published bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_pipeline.config import PipelineConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.events import EVENT_COLUMNS
from recsys_pipeline.ranking import NO_ITEM, dot_top_k, popular_unseen
from recsys_pipeline.sets import distinct

DATA_DOCS = Path("gx") / "uncommitted" / "data_docs" / "local_site"
# Cosine above this to another vector counts as a collapsed (duplicate) embedding.
COLLAPSE_COSINE = 0.9999
NEIGHBOUR_SAMPLE = 20_000


class ValidationFailedError(RecsysError):
    """A suite failed; the message names the suite, the expectation and what was observed."""


@dataclass(frozen=True)
class Failure:
    suite: str
    expectation: str
    column: str | None
    observed: Any

    def __str__(self) -> str:
        where = f" on {self.column}" if self.column else ""
        return f"{self.suite}: {self.expectation}{where} failed (observed {self.observed})"


def events_suite(config: PipelineConfig, start: pd.Timestamp, end: pd.Timestamp) -> list[Any]:
    """A bounded sample of the run's window of events (:func:`events_volume_suite` checks the count)."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableColumnsToMatchSet(column_set=[*EVENT_COLUMNS, "event_date"], exact_match=True),
        E.ExpectColumnValuesToNotBeNull(column="user_id"),
        E.ExpectColumnValuesToNotBeNull(column="item_id"),
        E.ExpectColumnValuesToBeInSet(column="event_type", value_set=config.events.event_types),
        E.ExpectColumnValuesToBeBetween(column="value", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="event_ts", min_value=start, max_value=end, strict_max=True),
    ]


def events_volume_suite(config: PipelineConfig, previous_rows: float | None = None) -> list[Any]:
    """One row, ``rows``: the window's exact event count; with ``previous_rows`` it must stay within the
    configured band of it, else it must be positive."""
    import great_expectations as gx

    E = gx.expectations
    band = config.validation.row_count_band
    if not previous_rows:
        return [E.ExpectColumnValuesToBeBetween(column="rows", min_value=1)]
    return [
        E.ExpectColumnValuesToBeBetween(
            column="rows",
            min_value=int(previous_rows * (1 - band)),
            max_value=int(previous_rows * (1 + band)) + 1,
        )
    ]


def ingest_summary_suite(config: PipelineConfig) -> list[Any]:
    import great_expectations as gx

    return [
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="quarantine_share", min_value=0, max_value=config.events.max_quarantine_share
        )
    ]


def interactions_suite(n_users: int, n_items: int) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="confidence"),
        E.ExpectColumnValuesToBeBetween(column="confidence", min_value=0, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="user_idx", min_value=0, max_value=n_users - 1),
        E.ExpectColumnValuesToBeBetween(column="item_idx", min_value=0, max_value=n_items - 1),
        E.ExpectCompoundColumnsToBeUnique(column_list=["user_idx", "item_idx"]),
    ]


def interaction_profile(user_idx: np.ndarray, item_idx: np.ndarray) -> pd.DataFrame:
    """One row from every training pair: density over users and items with data, median counts,
    the top item's share (counted with arrays, so it costs the pairs, never users x items)."""
    per_user = np.bincount(user_idx)
    per_item = np.bincount(item_idx)
    per_user, per_item = per_user[per_user > 0], per_item[per_item > 0]
    pairs = len(user_idx)
    return pd.DataFrame(
        {
            "density": [pairs / max(len(per_user) * len(per_item), 1)],
            "median_items_per_user": [float(np.median(per_user)) if pairs else 0.0],
            "median_users_per_item": [float(np.median(per_item)) if pairs else 0.0],
            "top_item_share": [float(per_item.max() / pairs) if pairs else 0.0],
        }
    )


def interaction_profile_suite(config: PipelineConfig) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    rules = config.validation
    return [
        E.ExpectColumnValuesToBeBetween(column="density", min_value=rules.min_density, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="median_items_per_user", min_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="median_users_per_item", min_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="top_item_share", max_value=rules.max_top_item_share),
    ]


def embeddings_suite(config: PipelineConfig, n_items: int, trained_items: int) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    rules = config.validation
    return [
        E.ExpectTableRowCountToEqual(value=trained_items),
        E.ExpectColumnValuesToBeBetween(column="idx", min_value=0, max_value=n_items - 1),
        E.ExpectColumnValuesToBeUnique(column="idx"),
        E.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        E.ExpectColumnMeanToBeBetween(
            column="norm", min_value=rules.min_mean_norm, max_value=rules.max_mean_norm
        ),
        E.ExpectColumnValuesToBeBetween(
            column="nearest_cosine", max_value=COLLAPSE_COSINE, mostly=1 - rules.max_collapsed_share
        ),
    ]


def cold_embeddings_suite(n_items: int, cold_items: int) -> list[Any]:
    """Mapped content vectors: one per cold item, all finite. Items with the same metadata map to
    the same vector, so the collapse check of learned vectors does not apply."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToEqual(value=cold_items),
        E.ExpectColumnValuesToBeBetween(column="idx", min_value=0, max_value=n_items - 1),
        E.ExpectColumnValuesToBeUnique(column="idx"),
        E.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
    ]


def content_summary_suite(config: PipelineConfig) -> list[Any]:
    """The share of the catalogue with content vectors and the map's held-out fit."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectColumnValuesToBeBetween(column="content_coverage", min_value=config.content.min_coverage),
        E.ExpectColumnValuesToBeBetween(column="content_map_r2", min_value=config.content.map.min_r2),
    ]


def item_drift_suite(config: PipelineConfig) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    rules = config.drift
    return [
        E.ExpectColumnMeanToBeBetween(column="neighbour_retention", min_value=rules.min_neighbour_retention),
        E.ExpectColumnMeanToBeBetween(column="neighbour_jaccard", min_value=rules.min_neighbour_overlap),
        E.ExpectColumnMeanToBeBetween(column="aligned_cosine", min_value=rules.min_aligned_cosine),
        E.ExpectColumnValuesToNotBeNull(column="aligned_cosine"),
    ]


def drift_summary_suite(config: PipelineConfig) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectColumnValuesToBeBetween(column="drift_rec_overlap", min_value=config.drift.min_rec_overlap),
        E.ExpectColumnValuesToBeBetween(column="drift_norm_ks", max_value=config.drift.max_norm_ks),
    ]


def recommendations_suite(config: PipelineConfig) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectColumnValuesToNotBeNull(column="user_id"),
        E.ExpectColumnValuesToNotBeNull(column="item_id"),
        E.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=config.recommendations.top_n),
        E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "rank"]),
        E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id"]),
    ]


def recommendations_summary(
    recs: pd.DataFrame, metrics: dict[str, float], popular: PopularComparison
) -> pd.DataFrame:
    """Share of active users served, catalogue coverage, and how the lists compare with the
    most-popular ones (:func:`compare_with_popular`)."""
    return pd.DataFrame(
        {
            "active_users_served": [metrics["batch_users_served"] / max(metrics["batch_active_users"], 1.0)],
            "catalogue_coverage": [metrics["batch_coverage"]],
            "popular_share": [popular.share],
            "coverage_over_popular": [popular.coverage_ratio],
            "coverage_over_popular_attainable": [popular.attainable_ratio],
        }
    )


@dataclass(frozen=True)
class PopularComparison:
    """Lists against the same users' most-popular lists (unseen items, as long).

    ``share``: the share of the lists' slots the popular lists fill too; 1.0 for a model that only
    repeats the popularity ranking. Not the share of slots going to a fixed top slice of the
    catalogue: where choices follow a power law that share is near 1 for the best possible lists
    too (measured on the synthetic log, 20M events: the generator's exact choice probabilities put
    every top-50 slot in the top 1% of items, while their lists share 39% with the most-popular
    list).

    ``coverage_ratio``: the distinct items the lists span over those the popular lists span; 1.0 or
    less for lists that collapse onto the popular ones or onto any fixed few. Unlike the share of
    the catalogue covered, it does not shrink as a long-tailed catalogue grows: on the synthetic
    logs the generator's exact best lists for 4,000 users span 6.6x the popular lists' items at
    20M events and 6.7x at 100M (ours 6.3x and 6.9x), yet 0.75% and 0.12% of the catalogue; on
    MovieLens-100k ours span 2.4x.

    ``attainable_ratio``: the most ``coverage_ratio`` can be: the items some listed user has not
    seen (no more than the lists have slots) over those the popular lists span. A small catalogue
    its users have mostly seen leaves little room above the popular lists (a fixture of 250 items:
    1.28x), however personal the lists.
    """

    share: float
    coverage_ratio: float
    attainable_ratio: float

    def coverage_floor(self, wanted: float) -> float:
        """The ``coverage_ratio`` the lists must reach: ``wanted``, or where the catalogue leaves
        less room than that above the popular lists, half of the room it leaves."""
        return min(wanted, (1.0 + self.attainable_ratio) / 2)


def compare_with_popular(
    recs: pd.DataFrame,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    popularity: np.ndarray,
    seen: sp.csr_matrix,
) -> PopularComparison:
    """The lists in ``recs`` against each of their users' most-popular unseen list (see
    :class:`PopularComparison`)."""
    if recs.empty:
        return PopularComparison(share=0.0, coverage_ratio=0.0, attainable_ratio=0.0)
    # An erased user's index keeps no id (a tombstone, see recsys_pipeline.erasure): not a key.
    named = np.flatnonzero(pd.notna(user_ids))
    users = named[pd.Index(user_ids[named]).get_indexer(recs["user_id"])]
    items = pd.Index(item_ids).get_indexer(recs["item_id"])
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    rows, starts, lengths = np.unique(users, return_index=True, return_counts=True)
    popular = popular_unseen(popularity, seen[rows], int(lengths.max()))
    shared = 0
    popular_items: set[int] = set()
    for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        compared = popular[row, :length]
        shared += int(np.isin(items[start : start + length], compared).sum())
        popular_items.update(compared[compared != NO_ITEM].tolist())
    seen_by_every_user = np.asarray((seen[rows] > 0).sum(axis=0)).ravel() == len(rows)
    attainable = min(len(popularity) - int(seen_by_every_user.sum()), len(items))
    return PopularComparison(
        share=float(shared) / len(items),
        coverage_ratio=len(distinct(items)) / max(len(popular_items), 1),
        attainable_ratio=attainable / max(len(popular_items), 1),
    )


def recommendations_summary_suite(config: PipelineConfig, popular: PopularComparison) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    rules = config.validation
    return [
        E.ExpectColumnValuesToBeBetween(column="active_users_served", min_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="catalogue_coverage", min_value=rules.min_rec_coverage),
        E.ExpectColumnValuesToBeBetween(column="popular_share", max_value=rules.max_rec_popular_share),
        E.ExpectColumnValuesToBeBetween(
            column="coverage_over_popular",
            min_value=popular.coverage_floor(rules.min_rec_coverage_over_popular),
        ),
    ]


def embedding_profile(
    idx: np.ndarray, factors: np.ndarray, sample_size: int = NEIGHBOUR_SAMPLE
) -> pd.DataFrame:
    """Per-vector norm, finiteness and cosine to its nearest other vector (within a sample for large sets)."""
    norms = np.linalg.norm(factors, axis=1)
    unit = factors / np.maximum(norms, 1e-12)[:, None]
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(unit), min(sample_size, len(unit)), replace=False))
    nearest = np.full(len(unit), np.nan)
    if len(sample) > 1:
        # Each vector's own row is excluded; the batches are scored on every core.
        itself = sp.identity(len(sample), dtype=np.float32, format="csr")
        _, best = dot_top_k(unit[sample], unit[sample], 1, seen=itself)
        nearest[sample] = best[:, 0]
    else:
        nearest[sample] = -1.0
    return pd.DataFrame(
        {"idx": idx, "norm": norms, "finite": np.isfinite(factors).all(axis=1), "nearest_cosine": nearest}
    )


def widened(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its narrower NumPy numbers (the matrix's 32-bit indices and confidences, the
    lists' ranks) as 64-bit ones, exactly: GX compares a column with a range in one vectorised step
    only when it holds int64 or float64, and otherwise calls Python for every value (0.3-0.6 s a run
    for four columns of 200k sampled rows)."""
    wider = {
        name: column.astype(np.float64 if column.dtype.kind == "f" else np.int64)
        for name, column in frame.items()
        if isinstance(column.dtype, np.dtype) and column.dtype.kind in "iuf" and column.dtype.itemsize < 8
    }
    return frame.assign(**wider) if wider else frame


def validate_frames(project_dir: Path, frames: dict[str, tuple[pd.DataFrame, list[Any]]]) -> list[Failure]:
    """Run each (frame, expectations) as a GX checkpoint in a new file-backed GX project under
    ``project_dir`` (a folder of its own: the validate stage's staging), then build the Data Docs over
    their results; return every failed expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    # GX re-reads the config_variables.yml it scaffolds (a template of comments: no variable is set
    # here) at every lookup of a context setting, hundreds a run (0.3 s of ten suites); without it, none.
    (Path(context.root_directory) / "uncommitted" / "config_variables.yml").unlink()
    # Runs are read from task logs, where a progress bar per metric batch is only noise.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("frames")
    failures: list[Failure] = []
    for name, (frame, expectations) in frames.items():
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[definition]))
        result = checkpoint.run(batch_parameters={"dataframe": widened(frame)})
        for validation in result.run_results.values():
            for outcome in validation.results:
                expectation = outcome.expectation_config
                if not outcome.success and expectation is not None:
                    observed = outcome.result.get(
                        "observed_value", outcome.result.get("partial_unexpected_list")
                    )
                    failures.append(
                        Failure(
                            name,
                            expectation.type,
                            expectation.kwargs.get("column"),
                            observed,
                        )
                    )
    # Each run stores its result; the site is built once over all of them (a docs action per
    # checkpoint would rebuild the whole site after every suite).
    context.build_data_docs()
    return failures
