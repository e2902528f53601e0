"""Replay over MovieLens-100k: a weekly run, then nightly refreshes on the following days."""

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys_pipeline.artifacts import RefreshRecord
from recsys_pipeline.config import load_config
from recsys_pipeline.drift import read_report
from recsys_pipeline.pipelines import NIGHTLY, WEEKLY, run_in_process
from recsys_pipeline.registry import NothingPublishedError, Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.serving import Recommender
from recsys_pipeline.stages.interactions import run_interactions
from recsys_pipeline.stages.refresh import run_refresh
from tests.conftest import TEST_OVERRIDES

WEEKLY_END = datetime(1998, 3, 20)
NIGHTS = 2  # enough for a chain: the second night folds into the first night's version

pytestmark = pytest.mark.e2e


def nightly(spark, config, day: datetime) -> tuple[RunContext, RefreshRecord]:
    run = RunContext.create(config, "recsys_nightly", day, day + timedelta(days=1), mode="refresh")
    result = run_in_process(NIGHTLY, run, spark)
    record = run.artifacts.refresh_record()
    assert record is not None and not result.escalated, record.reasons if record else None
    assert result.version is not None
    return run, record


def id_map(run: RunContext, name: str) -> dict[str, int]:
    ids = run.artifacts.interactions.ids(name)
    return {source_id: idx for idx, source_id in enumerate(ids)}


@pytest.fixture(scope="module")
def replay(spark, tmp_path_factory):
    config = load_config(overrides={"state_dir": str(tmp_path_factory.mktemp("replay")), **TEST_OVERRIDES})
    weekly = RunContext.create(config, "recsys_weekly", WEEKLY_END - timedelta(weeks=1), WEEKLY_END)
    assert run_in_process(WEEKLY, weekly, spark).version == "1"
    nights = [nightly(spark, config, WEEKLY_END + timedelta(days=n)) for n in range(NIGHTS)]
    return config, weekly, nights


def test_each_night_publishes_a_version_derived_from_the_one_before(replay) -> None:
    config, _, nights = replay
    versions = {row["version"]: row for row in Registry(config).list_versions()}
    assert sorted(versions) == [1, 2, 3]
    assert versions[1]["tags"]["kind"] == "full"
    for offset, (run, record) in enumerate(nights):
        tags = versions[2 + offset]["tags"]
        assert tags["kind"] == "refresh" and tags["parent_version"] == "1"
        assert tags["derived_from_version"] == str(1 + offset)
        assert tags["refresh_day"] == (WEEKLY_END + timedelta(days=offset)).date().isoformat()
        assert int(tags["users_updated"]) + int(tags["users_added"]) > 0
        assert record.users_added == int(tags["users_added"])
    status = Registry(config).champion_status()
    assert status["version"] == 3 and status["kind"] == "refresh"
    assert status["refresh"]["parent_version"] == 1 and status["refresh"]["day"] == "1998-03-21"
    assert {"users_updated", "users_added", "items_added", "refresh_s"} <= set(status["refresh"])
    assert status["metrics"]["index_recall_at_10"] >= config.index.min_recall
    assert status["metrics"]["index_rebuilt"] == 0.0  # upserted in place


def test_users_who_arrive_after_the_weekly_run_get_personal_recommendations(replay) -> None:
    config, weekly, nights = replay
    ratings = pd.read_csv(config.source.path, sep="\t", names=["user", "item", "rating", "ts"])
    first_seen = pd.to_datetime(ratings.groupby("user").ts.min(), unit="s")
    last_night_end = WEEKLY_END + timedelta(days=NIGHTS)
    newcomers = [str(u) for u, t in first_seen.items() if WEEKLY_END <= t < last_night_end]
    assert newcomers, "the replay window should contain users who first appear after the weekly run"
    before = Recommender(Registry(config).version_bundle("1"))
    after = Recommender(Registry(config).version_bundle(str(1 + NIGHTS)))
    for user in newcomers:
        assert user not in before.user_lookup
        assert after.has_user_vector[after.user_lookup[user]]
        recs = after.recommend(user, k=10)
        history = ratings[
            (ratings.user == int(user)) & (pd.to_datetime(ratings.ts, unit="s") < last_night_end)
        ]
        assert len(recs) == 10 and not set(history.item.astype(str)) & set(recs.item_id)
    # Personal lists differ from one another (a popularity fallback would give everyone the same list).
    lists = {tuple(after.recommend(user, k=10).item_id) for user in newcomers}
    assert len(lists) > 1 or len(newcomers) == 1


def test_id_maps_keep_every_old_index(replay) -> None:
    _, weekly, nights = replay
    previous = {name: id_map(weekly, name) for name in ("users", "items")}
    for run, _ in nights:
        for name in ("users", "items"):
            current = id_map(run, name)
            assert all(current[source_id] == idx for source_id, idx in previous[name].items())
            assert sorted(current.values()) == list(range(len(current)))
            previous[name] = current
    assert len(previous["users"]) > len(id_map(weekly, "users"))


def test_validation_takes_the_fold_ins_drift_only_when_the_champion_is_its_weekly_parent(replay) -> None:
    config, _, ((first, _), (second, _)) = replay

    def drifts(run: RunContext) -> tuple[dict[str, float], dict[str, float]]:
        metrics = run.artifacts.read_metrics()
        validated = {name: value for name, value in metrics.items() if name.startswith("drift_")}
        folded = {
            name.removeprefix("refresh_"): value
            for name, value in metrics.items()
            if name.startswith("refresh_drift_")
        }
        return validated, folded

    # The first night folded into the weekly version itself: one comparison serves both.
    validated, folded = drifts(first)
    assert (
        read_report(first.artifacts.parent_drift_dir, "1", config.drift) is not None and validated == folded
    )
    # The second folded into the first night's version, which validation compares with instead.
    validated, folded = drifts(second)
    assert read_report(second.artifacts.parent_drift_dir, "2", config.drift) is None
    assert set(validated) == set(folded) and validated != folded


def test_refresh_record_is_in_the_bundle_lineage(replay) -> None:
    config, _, (first, *_) = replay
    run, record = first
    lineage = json.loads((Registry(config).version_bundle("2").path / "lineage.json").read_text())
    assert lineage["tags"]["parent_version"] == "1" and lineage["tags"]["kind"] == "refresh"
    assert record.escalate is False and record.reasons == []
    assert np.isfinite(record.refresh_s)
    assert run.artifacts.refresh_record() == record


def test_a_night_recomputes_the_lists_of_users_it_refreshed_and_carries_the_others(replay) -> None:
    _, _, nights = replay
    (before, _), (night, _) = nights[-2], nights[-1]
    metrics = night.artifacts.read_metrics()
    assert 0 < metrics["batch_users_computed"] < metrics["batch_active_users"]
    assert metrics["batch_users_served"] == metrics["batch_active_users"]
    earlier, latest = (
        pq.read_table(run.artifacts.recommendations_file).to_pandas().groupby("user_id").item_id.apply(tuple)
        for run in (before, night)
    )
    refreshed = set(night.artifacts.interactions.ids("users")[night.artifacts.interactions.recent("users")])
    carried = [user for user in latest.index if user not in refreshed]
    assert carried and all(latest[user] == earlier[user] for user in carried)
    assert any(latest[user] != earlier.get(user) for user in refreshed & set(latest.index))


def interval_ids(run: RunContext, column: str) -> list[str]:
    """The ids of ``column`` with an event in the run's interval, as the lake holds them."""
    events = ds.dataset(str(run.layout.events_lake), format="parquet", partitioning="hive").to_table(
        columns=[column],
        filter=(ds.field("event_ts") >= run.interval_start) & (ds.field("event_ts") < run.interval_end),
    )
    return sorted(set(events.column(column).to_pylist()))


def decayed_copy(config, tmp_path: Path, holdout_strategy: str, broadcast_max_rows: int | None = None):
    """The replay's lake in a state folder under ``tmp_path``, configured with time decay (which makes
    carrying pairs non-trivial), the given holdout, any number of users enough to evaluate, and
    (if given) the bound on what joins by broadcast."""
    shutil.copytree(config.state_home / "lake", tmp_path / "state" / "lake")
    interactions = config.interactions.model_copy(
        update={
            "half_life_days": 30.0,
            "holdout": config.interactions.holdout.model_copy(update={"strategy": holdout_strategy}),
        }
    )
    return config.model_copy(
        update={
            "state_dir": tmp_path / "state",
            "interactions": interactions,
            "evaluation": config.evaluation.model_copy(update={"min_users": 1}),
            "spark": config.spark
            if broadcast_max_rows is None
            else config.spark.model_copy(update={"broadcast_max_rows": broadcast_max_rows}),
        }
    )


# A bound of 1 row: the nights' events aggregate with the carried pairs, the maps join by a shuffle
# (the slow tier's: this module's worker sets `make test`'s length).
@pytest.mark.parametrize(
    ("weekly_holdout", "broadcast_max_rows"),
    [("per_user_last", None), ("days", None), pytest.param("per_user_last", 1, marks=pytest.mark.slow)],
)
def test_nights_carry_the_pairs_forward_and_build_what_a_rebuild_from_every_event_builds(
    spark, replay, tmp_path: Path, weekly_holdout: str, broadcast_max_rows: int | None
) -> None:
    config, weekly, nights = replay
    assert weekly.artifacts.read_metrics()["history_carried"] == 0.0
    assert all(run.artifacts.read_metrics()["history_carried"] == 1.0 for run, _ in nights)
    # Decay makes carrying non-trivial: the carried aggregates must age as their events would. A
    # weekly with a global cut keeps pairs aggregated to the cut, then carried to its end.
    decayed = decayed_copy(config, tmp_path, weekly_holdout, broadcast_max_rows)
    run_interactions(
        spark, RunContext.create(decayed, "recsys_weekly", WEEKLY_END - timedelta(weeks=1), WEEKLY_END)
    )
    first_night = RunContext.create(
        decayed, "recsys_nightly", WEEKLY_END, WEEKLY_END + timedelta(days=1), mode="refresh"
    )
    run_interactions(spark, first_night)
    night = WEEKLY_END + timedelta(days=1)
    runs = {
        name: RunContext.create(
            decayed, "recsys_nightly", night, night + timedelta(days=1), name, mode="refresh"
        )
        for name in ("carried", "rebuilt")
    }
    run_interactions(spark, runs["carried"])
    # The pointer now names the carried night's own history, which ends after the rebuilt run starts.
    run_interactions(spark, runs["rebuilt"])
    carried, rebuilt = runs["carried"], runs["rebuilt"]
    assert (
        first_night.artifacts.read_metrics()["history_carried"]
        == carried.artifacts.read_metrics()["history_carried"]
        == 1.0
    )
    assert rebuilt.artifacts.read_metrics()["history_carried"] == 0.0
    assert (
        carried.artifacts.interactions.input_fingerprint()
        == rebuilt.artifacts.interactions.input_fingerprint()
    )
    for side in ("users", "items"):
        assert list(carried.artifacts.interactions.ids(side)) == list(
            rebuilt.artifacts.interactions.ids(side)
        )
    difference = carried.artifacts.interactions.train_matrix() - rebuilt.artifacts.interactions.train_matrix()
    assert (
        carried.artifacts.interactions.train_matrix().nnz
        == rebuilt.artifacts.interactions.train_matrix().nnz
        > 0
    )
    assert abs(difference).max() < 1e-4


def test_a_weekly_carries_the_last_nights_pairs_and_builds_what_a_rebuild_builds(
    spark, replay, tmp_path: Path
) -> None:
    config, _, _ = replay
    decayed = decayed_copy(config, tmp_path, "per_user_last")
    run_interactions(
        spark, RunContext.create(decayed, "recsys_weekly", WEEKLY_END - timedelta(weeks=1), WEEKLY_END)
    )
    night = RunContext.create(
        decayed, "recsys_nightly", WEEKLY_END, WEEKLY_END + timedelta(days=1), mode="refresh"
    )
    run_interactions(spark, night)
    # The next week ends a day after the night: the history carried ends inside its interval.
    end = WEEKLY_END + timedelta(days=2)
    runs = {
        name: RunContext.create(decayed, "recsys_weekly", end - timedelta(weeks=1), end, name)
        for name in ("carried", "rebuilt")
    }
    run_interactions(spark, runs["carried"])
    runs["rebuilt"].layout.pair_history.unlink()  # nothing to carry: it aggregates every event
    run_interactions(spark, runs["rebuilt"])
    carried, rebuilt = (runs[name].artifacts for name in ("carried", "rebuilt"))
    assert (
        carried.read_metrics()["history_carried"] == 1.0 and rebuilt.read_metrics()["history_carried"] == 0.0
    )
    assert carried.interactions.input_fingerprint() == rebuilt.interactions.input_fingerprint()
    for side in ("users", "items"):
        assert list(carried.interactions.ids(side)) == list(rebuilt.interactions.ids(side))
        np.testing.assert_array_equal(
            np.sort(carried.interactions.recent(side)), np.sort(rebuilt.interactions.recent(side))
        )
    # Items active only between the interval's start and the night's end are recent too.
    assert len(carried.interactions.recent("items")) > len(night.artifacts.interactions.recent("items"))
    for run in (night, runs["carried"]):
        for side in ("users", "items"):
            recent = run.artifacts.interactions.ids(side)[run.artifacts.interactions.recent(side)]
            assert sorted(recent) == interval_ids(run, side.removesuffix("s") + "_id")
    for matrix in ("train_matrix", "holdout_matrix"):
        kept, built = getattr(carried.interactions, matrix)(), getattr(rebuilt.interactions, matrix)()
        assert kept.nnz == built.nnz > 0
        np.testing.assert_array_equal(kept.indices, built.indices)
        assert abs(kept - built).max() < 1e-4


def test_a_night_before_every_version_s_data_has_nothing_to_fold_into(replay) -> None:
    config, weekly, _ = replay
    # The champion has trained through later days: folding an earlier night into it would publish
    # a model of that night that has seen the days after it.
    early = RunContext.create(
        config,
        "recsys_nightly",
        WEEKLY_END - timedelta(days=2),
        WEEKLY_END - timedelta(days=1),
        mode="refresh",
    )
    with pytest.raises(NothingPublishedError, match="no version of recsys-als to fold"):
        run_refresh(early)
