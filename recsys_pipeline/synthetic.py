"""Synthetic event logs with the shape of real ones, for scale tests and benchmarks.

- item popularity follows a power law (Zipf-like, exponent ``popularity_exponent``);
- users have latent tastes: each event's item is the best of a few popularity-sampled
  candidates by taste score plus noise, so the log holds structure ALS can learn;
- user activity is skewed too; event types follow affinity (purchases go to liked items);
- timestamps are spread over ``days`` days.

Output: Parquet files ``day=YYYY-MM-DD/part-NNNNN.parquet`` (one per day and generated chunk, as
production logs land one folder per day) with columns ``user`` (string), ``item`` (string),
``type`` (string), ``value`` (double: watch seconds for ``watch``, else 1) and ``ts`` (int64 unix
seconds), readable as a ``source`` with ``format: parquet``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.runs import atomic_dir
from recsys_pipeline.tables import Triples

EVENT_TYPES = np.array(["view", "click", "add_to_cart", "purchase", "watch"])
SOURCE_MAPPING = {
    "user_id": "user",
    "item_id": "item",
    "event_type": "type",
    "value": "value",
    "timestamp": "ts",
}


@dataclass(frozen=True)
class SyntheticSpec:
    events: int = 1_000_000
    users: int = 50_000
    items: int = 20_000
    latent_factors: int = 16
    candidates: int = 8
    popularity_exponent: float = 1.0
    days: int = 28
    start: str = "2024-01-01"
    seed: int = 0
    chunk_events: int = 2_000_000

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _power_law_cdf(size: int, exponent: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative probabilities of a shuffled power law (so popular ids are not simply the smallest)."""
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    order = rng.permutation(size)
    cdf = np.cumsum(weights / weights.sum())
    return cdf, order


def _draw(cdf: np.ndarray, order: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return order[np.minimum(np.searchsorted(cdf, rng.random(count)), len(cdf) - 1)]


@dataclass(frozen=True)
class EventChunk:
    """Events as dense integer ids: ``users``/``items`` index the spec's users and items."""

    users: np.ndarray
    items: np.ndarray
    types: np.ndarray
    values: np.ndarray
    ts: np.ndarray


def sample_events(spec: SyntheticSpec) -> Iterator[EventChunk]:
    """The spec's events in chunks of at most ``chunk_events``, reproducibly from ``seed``."""
    rng = np.random.default_rng(spec.seed)
    user_taste = rng.normal(size=(spec.users, spec.latent_factors)).astype(np.float32)
    item_traits = rng.normal(size=(spec.items, spec.latent_factors)).astype(np.float32)
    item_cdf, item_order = _power_law_cdf(spec.items, spec.popularity_exponent, rng)
    user_cdf, user_order = _power_law_cdf(spec.users, 0.5, rng)
    start = int(datetime.fromisoformat(spec.start).replace(tzinfo=UTC).timestamp())
    for offset in range(0, spec.events, spec.chunk_events):
        count = min(spec.chunk_events, spec.events - offset)
        users = _draw(user_cdf, user_order, count, rng)
        candidates = _draw(item_cdf, item_order, count * spec.candidates, rng).reshape(count, spec.candidates)
        affinity = np.einsum("ef,ecf->ec", user_taste[users], item_traits[candidates]) / np.sqrt(
            spec.latent_factors
        )
        affinity += rng.gumbel(size=affinity.shape).astype(np.float32)
        best = affinity.argmax(axis=1)
        items = candidates[np.arange(count), best]
        strength = affinity[np.arange(count), best]
        # Stronger affinity moves an event up the funnel: view < click < add_to_cart < purchase.
        level = np.digitize(strength + rng.normal(scale=0.5, size=count), [1.5, 2.5, 3.2])
        watch = rng.random(count) < 0.1
        yield EventChunk(
            users=users,
            items=items,
            types=np.where(watch, 4, level),
            values=np.where(watch, np.round(rng.gamma(2.0, 300.0, count), 1), 1.0),
            ts=start + rng.integers(0, spec.days * 86_400, count),
        )


def interaction_matrix(spec: SyntheticSpec) -> sp.csr_matrix:
    """(users x items) count of events per pair."""
    chunks = list(sample_events(spec))
    users = np.concatenate([chunk.users for chunk in chunks])
    items = np.concatenate([chunk.items for chunk in chunks])
    return Triples(users, items, np.ones(len(users), np.float32)).to_csr(spec.users, spec.items)


def generate(spec: SyntheticSpec, out_dir: Path) -> int:
    """Write ``spec.events`` events to ``out_dir``, one folder per day; return the number of files."""
    user_names = np.char.add("u", np.arange(spec.users).astype(str)).astype(object)
    item_names = np.char.add("i", np.arange(spec.items).astype(str)).astype(object)
    start = int(datetime.fromisoformat(spec.start).replace(tzinfo=UTC).timestamp())
    files = 0
    with atomic_dir(out_dir) as staging:
        staging.mkdir(parents=True)
        for number, chunk in enumerate(sample_events(spec)):
            days = (chunk.ts - start) // 86_400
            for day in np.unique(days):
                rows = np.flatnonzero(days == day)
                table = pa.table(
                    {
                        "user": pa.array(user_names[chunk.users[rows]], pa.string()),
                        "item": pa.array(item_names[chunk.items[rows]], pa.string()),
                        "type": pa.array(EVENT_TYPES[chunk.types[rows]], pa.string()),
                        "value": pa.array(chunk.values[rows], pa.float64()),
                        "ts": pa.array(chunk.ts[rows], pa.int64()),
                    }
                )
                folder = staging / f"day={datetime.fromtimestamp(start + int(day) * 86_400, UTC).date()}"
                folder.mkdir(exist_ok=True)
                pq.write_table(table, folder / f"part-{number:05d}.parquet")
                files += 1
    return files
