"""`recsys replay`: weekly DAG runs over a range of weeks, in order, reported in HTML and in MLflow."""

import json
from datetime import date
from pathlib import Path

import pytest

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import load_config
from recsys_pipeline.registry import list_versions
from recsys_pipeline.replay import ReplayRangeError, week_ends
from recsys_pipeline.tracking import client, experiment_id
from tests.test_dags import recsys


def test_a_replay_covers_every_seventh_day_from_its_first_week_end() -> None:
    weeks = week_ends(date(1998, 4, 2), date(1998, 4, 22))
    assert weeks == [date(1998, 4, 2), date(1998, 4, 9), date(1998, 4, 16)]
    with pytest.raises(ReplayRangeError, match="before --from"):
        week_ends(date(1998, 4, 9), date(1998, 4, 2))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_dry_replay_judges_each_week_against_the_one_before_and_moves_no_alias(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = load_config(overrides={"state_dir": str(home)})
    env = airflow_environment(config, None) | {"RECSYS_HOME": str(home)}
    env["AIRFLOW_HOME"] = str(home / "airflow")
    env["AIRFLOW_CONN_RECSYS_SPARK"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
    recsys("airflow", "db", "migrate", env=env)
    result = recsys("replay", "--from", "1998-04-16", "--to", "1998-04-23", env=env)
    folder = home / "reports" / "replay_1998-04-16_1998-04-23"
    assert f"replay report: {folder / 'report.html'}" in result.stdout
    summary = json.loads((folder / "replay.json").read_text())
    first, second = summary["weeks"]
    assert [first["window_end"], second["window_end"]] == ["1998-04-16", "1998-04-23"]
    assert first["succeeded"] and second["succeeded"]
    # No champion before: the first week has nothing to be judged against; the second week is judged
    # against the first, which passed every gate in the replay without moving the alias.
    assert first["reference_version"] is None and second["reference_version"] == first["version"]
    assert all("would promote" in week["decision"] for week in (first, second))
    assert summary["champion_before"] is None and summary["champion_after"] is None
    versions = {row["version"]: row for row in list_versions(config)}
    assert versions[first["version"]]["aliases"] == [] and versions[second["version"]]["aliases"] == []
    page = (folder / "report.html").read_text()
    assert "champion unchanged" in page and page.count("<tr>") == 3
    for plot in ("quality.png", "drift.png", "stages.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    bound = client(config)
    (replay_run,) = bound.search_runs([experiment_id(bound, config)], "tags.kind = 'replay'")
    logged = {artifact.path for artifact in bound.list_artifacts(replay_run.info.run_id, "replay")}
    assert {"replay/report.html", "replay/quality.png", "replay/replay.json"} <= logged
