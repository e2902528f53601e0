"""The DAGs under a real Airflow (``recsys airflow standalone``: scheduler, DAG processor and API server
on a free port, LocalExecutor on SQLite), triggered through the REST API and the CLI and backfilled;
then the champion served by ``mlflow models serve`` with its default environment manager.

Slow (several whole DAG runs and a model environment built from scratch): ``make test-slow``, in CI.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import load_config
from recsys_pipeline.registry import Registry
from tests.conftest import free_port, invocations, start, stop
from tests.test_dags import RECSYS, WEEKLY_TASKS, airflow_json, recsys

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG = "recsys_weekly"
RUN_TIMEOUT_S = 900


class Airflow:
    """A running ``recsys airflow standalone`` and its REST API."""

    def __init__(self, env: dict[str, str], port: int, process: subprocess.Popen | None):
        self.env, self.base, self.process = env, f"http://127.0.0.1:{port}", process
        with urllib.request.urlopen(f"{self.base}/auth/token", timeout=30) as response:
            self.token = json.loads(response.read())["access_token"]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def wait_for_runs(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + RUN_TIMEOUT_S * len(run_ids)
        while time.monotonic() < deadline:
            runs = {run_id: self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}") for run_id in run_ids}
            if all(run["state"] in ("success", "failed") for run in runs.values()):
                return runs
            time.sleep(5)
        raise AssertionError(f"runs {run_ids} did not finish: {[run['state'] for run in runs.values()]}")

    def task_states(self, run_id: str) -> dict[str, str]:
        instances = self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {row["task_id"]: row["state"] for row in instances}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Iterator[Airflow]:
    home = tmp_path_factory.mktemp("scheduled_home")
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # Manual and backfill runs only: the sample's weeks are decades before the clock's.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    env = airflow_environment(load_config(overrides={"state_dir": str(home)}), None) | env
    env["AIRFLOW_HOME"] = str(home / "airflow")
    env["AIRFLOW_CONN_RECSYS_SPARK"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
    recsys("airflow", "db", "migrate", env=env)
    log = home / "standalone.log"
    process = start(
        [RECSYS, "airflow", "standalone"], env, f"http://127.0.0.1:{port}/api/v2/monitor/health", log
    )
    try:
        server = Airflow(env, port, process)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the DAG processor parses the DAG folder after start-up
            try:
                server.api("PATCH", f"/dags/{DAG}", {"is_paused": False})
                break
            except urllib.error.HTTPError:
                time.sleep(3)
        else:
            raise AssertionError(f"{DAG} was never parsed: {log.read_text()[-3000:]}")
        yield server
    finally:
        stop(process)


def status(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(recsys("status", "--json", env=env).stdout)


def test_rest_and_cli_triggers_for_a_date_run_the_week_ending_there(airflow: Airflow) -> None:
    # Two weeks, one per trigger path: Airflow keeps one run per logical date and DAG.
    rest = airflow.api(
        "POST",
        f"/dags/{DAG}/dagRuns",
        {"dag_run_id": "rest__1998-04-16", "logical_date": "1998-04-16T00:00:00Z"},
    )
    runs = airflow.wait_for_runs([rest["dag_run_id"]])
    assert status(airflow.env)["data_window"]["end"].startswith("1998-04-16")
    recsys(
        "airflow",
        "dags",
        "trigger",
        DAG,
        "--logical-date",
        "1998-04-23T00:00:00+00:00",
        "--run-id",
        "cli__1998-04-23",
        env=airflow.env,
    )
    runs |= airflow.wait_for_runs(["cli__1998-04-23"])
    for run_id, run in runs.items():
        assert run["state"] == "success", (run_id, airflow.task_states(run_id))
        assert airflow.task_states(run_id) == dict.fromkeys(WEEKLY_TASKS, "success")
    # The REST API's interval is the week ending at the logical date; Airflow's CLI trigger dates its
    # interval by the wall clock, so for both the tasks' window is checked: their run folders.
    assert runs["rest__1998-04-16"]["data_interval_start"].startswith("1998-04-09T00:00:00")
    assert runs["rest__1998-04-16"]["data_interval_end"].startswith("1998-04-16T00:00:00")
    for window in ("1998-04-09T0000_1998-04-16T0000", "1998-04-16T0000_1998-04-23T0000"):
        folder = Path(airflow.env["RECSYS_HOME"]) / "runs" / DAG / window
        assert len([path for path in folder.iterdir() if path.is_dir()]) == 1, window
    champion = status(airflow.env)
    assert champion["version"] == 2 and champion["data_window"]["start"].startswith("1998-04-16")
    assert champion["data_window"]["end"].startswith("1998-04-23")


def test_a_backfill_runs_earlier_weeks_one_at_a_time_and_leaves_the_champion(airflow: Airflow) -> None:
    before = status(airflow.env)
    recsys(
        "airflow",
        "backfill",
        "create",
        "--dag-id",
        DAG,
        "--from-date",
        "1998-03-15",
        "--to-date",
        "1998-03-31",
        env=airflow.env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        backfilled = [
            run
            for run in airflow_json("dags", "list-runs", DAG, env=airflow.env)
            if "backfill" in run["run_id"]
        ]
        if len(backfilled) == 3:
            break
        time.sleep(3)
    assert len(backfilled) == 3, backfilled
    runs = airflow.wait_for_runs([run["run_id"] for run in backfilled])
    ordered = sorted(runs.values(), key=lambda run: run["data_interval_end"])
    for run in ordered:
        # Older than the champion's data: judged against the champion of their own time (none yet),
        # recorded as would-promote, and promote skipped.
        assert run["state"] == "success", (run["dag_run_id"], airflow.task_states(run["dag_run_id"]))
        assert airflow.task_states(run["dag_run_id"])["promote"] == "skipped"
    for earlier, later in zip(ordered, ordered[1:], strict=False):
        assert datetime.fromisoformat(earlier["end_date"]) <= datetime.fromisoformat(later["start_date"])
    after = status(airflow.env)
    assert (after["version"], after["run_id"]) == (before["version"], before["run_id"])


def test_the_champion_serves_from_its_own_environment_built_by_mlflow(
    airflow: Airflow, tmp_path: Path
) -> None:
    # `mlflow models serve` with its default environment manager (virtualenv: pyenv's Python and the
    # model's own requirements): the project is not installed there, its code travels in the model.
    config = load_config(overrides={"state_dir": airflow.env["RECSYS_HOME"]})
    champion = status(airflow.env)
    model = Registry(config).verified_model(str(champion["version"]))
    port = free_port()
    env = {**airflow.env, "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    mlflow = str(Path(RECSYS).parent / "mlflow")
    server = start(
        [mlflow, "models", "serve", "-m", str(model), "--host", "127.0.0.1", "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/ping",
        tmp_path / "serve.log",
        timeout_s=900,
    )
    try:
        served = invocations(port, [{"user_id": "1", "k": 5}])
    finally:
        stop(server)
    assert "Creating a new environment" in (tmp_path / "serve.log").read_text()
    expected = json.loads(recsys("recommend", "--user-id", "1", "-k", "5", "--json", env=airflow.env).stdout)
    assert served["item_id"].tolist() == [row["item_id"] for row in expected]
