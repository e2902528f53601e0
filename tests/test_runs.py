import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pendulum
import pytest

from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir, linked_copy, write_json
from recsys_pipeline.runs import RunContext, parse_instant


def test_instants_become_plain_utc_datetimes() -> None:
    from_airflow = parse_instant(pendulum.datetime(1998, 4, 23, tz="Europe/Paris"))
    assert type(from_airflow) is datetime and from_airflow == datetime(1998, 4, 22, 22, tzinfo=UTC)
    assert parse_instant("1998-04-23") == datetime(1998, 4, 23, tzinfo=UTC)
    assert parse_instant("1998-04-23 02:00:00+02:00") == datetime(1998, 4, 23, tzinfo=UTC)


def test_run_paths_derive_from_the_interval_and_the_run_id(make_config) -> None:
    run = RunContext.create(make_config(), "recsys_weekly", "1998-04-16", "1998-04-23", "scheduled__1998:04")
    assert run.run_dir.name == "scheduled__1998~3A04"
    assert run.run_dir.parent.name == "1998-04-16T0000_1998-04-23T0000"
    assert run.run_dir.parent.parent.name == "recsys_weekly"
    other = RunContext.create(run.config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__again")
    assert other.window_dir == run.window_dir and other.run_dir != run.run_dir
    with pytest.raises(RecsysError, match="is not after its start"):
        RunContext.create(make_config(), "d", "1998-04-23", "1998-04-23")


def test_a_published_run_is_frozen_and_the_window_points_at_it(make_config) -> None:
    run = RunContext.create(make_config(), "recsys_weekly", "1998-04-16", "1998-04-23", "manual__a")
    run.publication.refuse_if_published("train")
    run.publication.mark_published("recsys-als", "3")
    assert run.publication.published_version() == "3"
    pointer = json.loads((run.window_dir / "published.json").read_text())
    assert pointer["version"] == "3" and pointer["run_dir"] == "manual__a"
    with pytest.raises(RecsysError, match="train: run manual__a was published as version 3"):
        run.publication.refuse_if_published("train")
    other = RunContext.create(run.config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__b")
    other.publication.refuse_if_published("train")


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("half-written")
        raise RuntimeError("stage crashed")
    assert (target / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_linked_copy_keeps_its_content_when_the_original_is_written_anew(tmp_path: Path) -> None:
    """What the pipeline writes replaces a file by name (a new file), never in place: a bundle's file
    linked to a run's output keeps what it was published with."""
    original, bundled = tmp_path / "metrics.json", tmp_path / "bundle.json"
    write_json(original, {"ndcg": 0.27})
    linked_copy(original, bundled)
    assert bundled.stat().st_ino == original.stat().st_ino
    write_json(original, {"ndcg": 0.31})
    with atomic_dir(tmp_path / "folder") as staging:
        staging.mkdir()
        linked_copy(original, staging / "kept.json")
    write_json(original, {"ndcg": 0.35})
    assert json.loads(bundled.read_text()) == {"ndcg": 0.27}
    assert json.loads((tmp_path / "folder" / "kept.json").read_text()) == {"ndcg": 0.31}


def test_every_task_of_a_run_uses_the_config_its_first_task_saw(tmp_path: Path) -> None:
    state = {"state_dir": str(tmp_path / "state")}
    first = RunContext.open(
        "recsys_weekly", "run-1", "1998-04-16", "1998-04-23", overrides={**state, "als.factors": 8}
    )
    # The YAML (here: the overrides) changes while the run is under way: its later tasks keep 8.
    later = RunContext.open(
        "recsys_weekly", "run-1", "1998-04-16", "1998-04-23", overrides={**state, "als.factors": 32}
    )
    assert first.config.als.factors == later.config.als.factors == 8
    assert later.config == first.config
    assert later.config.interactions.event_weights["rating"].value_map == {
        1.0: 1,
        2.0: 1,
        3.0: 2,
        4.0: 3,
        5.0: 4,
    }
    # Another run of the same interval takes its own snapshot.
    rerun = RunContext.open(
        "recsys_weekly", "run-2", "1998-04-16", "1998-04-23", overrides={**state, "als.factors": 32}
    )
    assert rerun.config.als.factors == 32


def test_a_manual_run_covers_the_period_ending_at_its_logical_date() -> None:
    from recsys_pipeline.orchestration import run_window

    week = timedelta(weeks=1)
    wall_clock = datetime(2026, 11, 28, tzinfo=UTC)
    asked = datetime(1998, 4, 23, tzinfo=UTC)
    # Airflow's CLI trigger infers the interval from the wall clock; the logical date says what was meant.
    assert run_window("manual", asked, wall_clock - week, wall_clock) == (asked - week, asked)
    assert run_window("DagRunType.MANUAL", asked, asked - week, asked) == (asked - week, asked)
    # Scheduled and backfill runs keep the interval their timetable gave them.
    assert run_window("scheduled", wall_clock - week, wall_clock - week, wall_clock) == (
        wall_clock - week,
        wall_clock,
    )
    assert run_window("backfill", asked - week, asked - week, asked) == (asked - week, asked)


def test_version_tags_round_trip_through_the_registry_form_and_refuse_a_foreign_version() -> None:
    from types import SimpleNamespace

    from recsys_pipeline.artifacts import RefreshLineage
    from recsys_pipeline.registry import VersionTags

    end = datetime(1998, 4, 23, tzinfo=UTC)
    nightly = VersionTags(
        dag_id="recsys_nightly",
        airflow_run_id="scheduled__1998-04-23",
        run_key="recsys_nightly/1998-04-22T0000_1998-04-23T0000",
        data_interval_start=datetime(1998, 4, 22, tzinfo=UTC),
        data_interval_end=end,
        source="ml-100k",
        input_fingerprint="f",
        config_hash="c",
        code_version="v",
        backend="implicit",
        bundle_format="3",
        kind="refresh",
        lineage=RefreshLineage("4", "5", "1998-04-22", 10, 2, 1, 0.25),
    )
    tags = nightly.as_tags()
    assert tags["data_interval_end"] == "1998-04-23T00:00:00+00:00" and tags["users_added"] == "2"
    assert VersionTags.of(SimpleNamespace(version="6", tags=tags)) == nightly
    weekly_tags = {name: value for name, value in tags.items() if name not in nightly.lineage.tags()}
    weekly = VersionTags.of(SimpleNamespace(version="7", tags=weekly_tags | {"kind": "full"}))
    assert weekly.lineage is None and weekly.identity() == nightly.identity()
    with pytest.raises(RecsysError, match="version 8 lacks the tags code_version: it was not published"):
        VersionTags.of(
            SimpleNamespace(version="8", tags={k: v for k, v in tags.items() if k != "code_version"})
        )
