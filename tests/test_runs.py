from datetime import UTC, datetime
from pathlib import Path

import pendulum
import pytest

from recsys_pipeline.runs import RunContext, atomic_dir, parse_instant


def test_instants_become_plain_utc_datetimes() -> None:
    from_airflow = parse_instant(pendulum.datetime(1998, 4, 23, tz="Europe/Paris"))
    assert type(from_airflow) is datetime and from_airflow == datetime(1998, 4, 22, 22, tzinfo=UTC)
    assert parse_instant("1998-04-23") == datetime(1998, 4, 23, tzinfo=UTC)
    assert parse_instant("1998-04-23 02:00:00+02:00") == datetime(1998, 4, 23, tzinfo=UTC)


def test_run_paths_derive_from_the_interval(make_config) -> None:
    run = RunContext.create(make_config(), "recsys_weekly", "1998-04-16", "1998-04-23")
    assert run.run_dir.name == "1998-04-16T0000_1998-04-23T0000"
    assert run.run_dir.parent.name == "recsys_weekly"
    with pytest.raises(ValueError, match="is not after its start"):
        RunContext.create(make_config(), "d", "1998-04-23", "1998-04-23")


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
