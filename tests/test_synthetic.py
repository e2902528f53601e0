from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys_pipeline.events import ingest, read_source
from recsys_pipeline.synthetic import (
    SOURCE_MAPPING,
    SyntheticSpec,
    SyntheticWorld,
    generate,
    sample_events,
    write_item_metadata,
)

SPEC = SyntheticSpec(events=60_000, users=2_000, items=1_500, days=14, chunk_events=25_000, seed=3)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synthetic") / "events"
    assert generate(SPEC, out) == 3 * 14  # three chunks, each split into the 14 days' folders
    return out, ds.dataset(str(out), format="parquet").to_table()


def test_generation_is_deterministic_per_seed(log, tmp_path: Path) -> None:
    _, table = log
    generate(SPEC, tmp_path / "again")
    assert ds.dataset(str(tmp_path / "again"), format="parquet").to_table().equals(table)


def test_popularity_follows_a_power_law_and_timestamps_span_the_days(log) -> None:
    _, table = log
    counts = np.sort(np.unique(table.column("item").to_numpy(zero_copy_only=False), return_counts=True)[1])[
        ::-1
    ]
    top_share = counts[: len(counts) // 100].sum() / counts.sum()
    assert top_share > 0.15  # the top 1% of items draw far more than 1% of events
    ts = table.column("ts").to_numpy()
    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    assert ts.min() >= start and ts.max() < start + 14 * 86_400
    assert set(table.column("type").unique().to_pylist()) == {
        "view",
        "click",
        "add_to_cart",
        "purchase",
        "watch",
    }


def test_event_types_follow_affinity_not_chance(log) -> None:
    """Events further up the funnel go to items their users like more, by the generator's own tastes."""
    _, table = log
    world = SyntheticWorld.of(SPEC)
    users = np.char.lstrip(table.column("user").to_numpy(zero_copy_only=False).astype(str), "u").astype(int)
    items = np.char.lstrip(table.column("item").to_numpy(zero_copy_only=False).astype(str), "i").astype(int)
    taste = np.einsum("ef,ef->e", world.user_taste[users], world.item_traits[items])
    types = table.column("type").to_numpy(zero_copy_only=False)
    mean_taste = [taste[types == name].mean() for name in ("view", "click", "add_to_cart", "purchase")]
    assert mean_taste == sorted(mean_taste) and mean_taste[0] < mean_taste[-1] - 1.0


def test_generated_log_ingests_as_a_parquet_source(tmp_path, log, spark, make_config) -> None:
    out, _ = log
    config = make_config(
        **{"source": {"name": "synthetic", "path": str(out), "format": "parquet", "mapping": SOURCE_MAPPING}}
    )
    result = ingest(
        read_source(spark, config.source),
        config.source,
        config.events,
        datetime(2024, 1, 1, tzinfo=UTC),
        datetime(2024, 2, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
        tmp_path / "staging",
    )
    assert result.metrics["events_read"] == SPEC.events
    assert result.metrics["events_quarantined"] == result.metrics["quarantine_duplicate"]
    assert result.metrics["quarantine_share"] < 0.001


def test_each_day_folder_holds_that_days_events_only(log) -> None:
    out, _ = log
    for folder in sorted(out.glob("day=*")):
        day = datetime.fromisoformat(folder.name.removeprefix("day=")).replace(tzinfo=UTC)
        ts = ds.dataset(str(folder), format="parquet").to_table(columns=["ts"]).column("ts").to_numpy()
        assert ts.min() >= day.timestamp() and ts.max() < day.timestamp() + 86_400, folder.name


def test_item_metadata_follows_the_items_traits(tmp_path: Path) -> None:
    """Items sharing a category are closer in trait space than random pairs, and every item has a row."""
    path = tmp_path / "items.parquet"
    write_item_metadata(SPEC, path)
    table = pq.read_table(path)
    assert table.column("item").to_pylist() == [f"i{n}" for n in range(SPEC.items)]
    assert all(len(title.split()) == SPEC.tokens_per_item for title in table.column("title").to_pylist())
    traits = SyntheticWorld.of(SPEC).item_traits
    traits = traits / np.linalg.norm(traits, axis=1, keepdims=True)
    category = np.asarray(table.column("category").to_pylist())
    same = [traits[category == name].mean(axis=0) for name in np.unique(category)]
    within = np.mean([np.linalg.norm(centre) for centre in same])
    shuffled = np.random.default_rng(0).permutation(category)
    across = np.mean([np.linalg.norm(traits[shuffled == name].mean(axis=0)) for name in np.unique(category)])
    assert within > 2 * across


def test_another_event_stream_draws_new_events_from_the_same_world() -> None:
    spec = SyntheticSpec(events=20_000, users=500, items=300, days=7, seed=3)
    later = SyntheticSpec(
        events=20_000, users=500, items=300, days=7, seed=3, start="2024-01-08", event_stream=1
    )
    world, later_world = SyntheticWorld.of(spec), SyntheticWorld.of(later)
    np.testing.assert_array_equal(world.user_taste, later_world.user_taste)
    np.testing.assert_array_equal(world.item_traits, later_world.item_traits)
    (first,), (second,) = sample_events(spec), sample_events(later)
    assert not np.array_equal(first.users, second.users)
    assert second.ts.min() >= first.ts.max() - 1  # the later stretch starts where the first ends
    # Drawn from the same popularity: the items chosen most often agree.
    top = {int(i) for i in np.argsort(-np.bincount(first.items, minlength=300))[:20]}
    later_top = {int(i) for i in np.argsort(-np.bincount(second.items, minlength=300))[:20]}
    assert len(top & later_top) >= 12
