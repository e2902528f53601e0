"""`recsys replay`: weekly and nightly DAG runs over a range of days, in order, reported in HTML and
in MLflow."""

import json
from datetime import date
from pathlib import Path

import pytest
import yaml

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import SAMPLE_PROFILE_PATH, load_config
from recsys_pipeline.registry import Registry
from recsys_pipeline.replay import (
    NIGHTLY,
    WEEKLY,
    ReplayedRun,
    ReplayRangeError,
    champion_timeline,
    planned_runs,
)
from recsys_pipeline.tracking import client, experiment_id
from tests.test_dags import recsys


def test_a_replay_runs_the_weekly_every_seventh_day_and_the_nightly_between() -> None:
    plan = planned_runs(date(1998, 4, 2), date(1998, 4, 10), weekly_only=False)
    assert plan[:2] == [(WEEKLY, date(1998, 4, 2)), (NIGHTLY, date(1998, 4, 3))]
    assert [day for dag_id, day in plan if dag_id == WEEKLY] == [date(1998, 4, 2), date(1998, 4, 9)]
    assert [day.day for _, day in plan] == list(range(2, 11))
    weekly = planned_runs(date(1998, 4, 2), date(1998, 4, 22), weekly_only=True)
    assert weekly == [(WEEKLY, date(1998, 4, 2)), (WEEKLY, date(1998, 4, 9)), (WEEKLY, date(1998, 4, 16))]
    with pytest.raises(ReplayRangeError, match="before --from"):
        planned_runs(date(1998, 4, 9), date(1998, 4, 2), weekly_only=False)


def test_the_champion_of_its_time_moves_only_to_runs_that_passed() -> None:
    def run(version: int | None, passed: bool, reference: int | None = None) -> ReplayedRun:
        return ReplayedRun(
            WEEKLY, date(1998, 4, 2), True, "", version, reference_version=reference, passed=passed
        )

    runs = [run(4, False, reference=3), run(5, True), run(None, False), run(6, False), run(7, True)]
    assert champion_timeline(runs) == [3, 5, 5, 5, 7]
    assert champion_timeline([]) == []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_dry_replay_builds_each_run_on_the_ones_before_and_moves_no_alias(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # A parent older than a day and a half escalates: the second nightly hands over to a weekly run.
    raw = yaml.safe_load(SAMPLE_PROFILE_PATH.read_text()) | {"refresh": {"max_parent_age_days": 1.5}}
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = load_config(config_file, overrides={"state_dir": str(home)})
    env = airflow_environment(config, str(config_file)) | {"RECSYS_HOME": str(home)}
    env["AIRFLOW_HOME"] = str(home / "airflow")
    env["AIRFLOW_CONN_RECSYS_SPARK"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
    recsys("airflow", "db", "migrate", env=env)
    result = recsys("replay", "--from", "1998-04-16", "--to", "1998-04-18", env=env)
    folder = home / "reports" / "replay_1998-04-16_1998-04-18"
    assert f"replay report: {folder / 'report.html'}" in result.stdout
    summary = json.loads((folder / "replay.json").read_text())
    weekly, nightly, escalating, handed_over = summary["runs"]
    assert [(run["dag_id"], run["window_end"]) for run in summary["runs"]] == [
        (WEEKLY, "1998-04-16"),
        (NIGHTLY, "1998-04-17"),
        (NIGHTLY, "1998-04-18"),
        (WEEKLY, "1998-04-18"),
    ]
    assert all(run["succeeded"] for run in summary["runs"])
    # No champion before: the first week has nothing to be judged against. Each later run builds on
    # the run before it, which passed every gate in the replay without moving the alias.
    assert weekly["reference_version"] is None
    assert nightly["reference_version"] == weekly["version"]
    assert escalating["reference_version"] == nightly["version"] and escalating["version"] is None
    assert escalating["escalated"] and "refresh.max_parent_age_days=1.5" in escalating["decision"]
    assert handed_over["reference_version"] == nightly["version"]
    passed = (weekly, nightly, handed_over)
    assert all("would promote" in run["decision"] for run in passed)
    assert [run["champion_of_its_time"] for run in summary["runs"]] == [
        weekly["version"],
        nightly["version"],
        nightly["version"],
        handed_over["version"],
    ]
    assert summary["champion_before"] is None and summary["champion_after"] is None
    versions = {row["version"]: row for row in Registry(config).list_versions()}
    assert all(versions[run["version"]]["aliases"] == [] for run in passed)
    # The nightly folded into the replay's own weekly, and its lineage says so.
    assert versions[nightly["version"]]["tags"]["parent_version"] == str(weekly["version"])
    page = (folder / "report.html").read_text()
    assert "champion unchanged" in page and page.count("<tr>") == 5
    for plot in ("quality.png", "drift.png", "champion.png", "stages.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    bound = client(config)
    (replay_run,) = bound.search_runs([experiment_id(bound, config)], "tags.kind = 'replay'")
    logged = {artifact.path for artifact in bound.list_artifacts(replay_run.info.run_id, "replay")}
    assert {"replay/report.html", "replay/champion.png", "replay/replay.json"} <= logged
