"""The DAGs on Airflow as a team deploys it (issue #34, item 1): metadata on PostgreSQL, the
CeleryExecutor with Redis as broker, two Celery workers with working folders of their own, the
scheduler, DAG processor and API server as separate processes; runs coordinate through PostgreSQL
advisory locks. The weekly, then the nightly, triggered through the REST API, succeed with tasks on
both workers, and ``recsys doctor`` passes on each worker.

Several Airflow processes and two whole DAG runs, about 6 minutes: ``make test-deploy``, in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import SAMPLE_PROFILE_PATH, load_config
from tests.conftest import free_port, postgres_database, start, stop
from tests.test_airflow_scheduler import Airflow
from tests.test_dags import NIGHTLY_TASKS, RECSYS, WEEKLY_TASKS, recsys

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.deploy]

AIRFLOW = str(Path(sys.executable).parent / "airflow")
RUN_TIMEOUT_S = 1500
WORKERS = ("worker-a", "worker-b")
# Airflow records a task's host through [core] hostname_callable: here, the worker's own name.
IDENTITY = "import os\n\ndef name():\n    return os.environ.get('RECSYS_TEST_WORKER', 'control')\n"


class Deployment(Airflow):
    """The deployment's REST API (see :class:`~tests.test_airflow_scheduler.Airflow`)."""

    def __init__(self, env: dict[str, str], port: int):
        super().__init__(env, port, None)

    def run(self, dag_id: str, logical_date: str) -> dict[str, Any]:
        """Trigger ``dag_id`` for ``logical_date`` through the REST API and wait for the run to end."""
        deadline = time.monotonic() + 180
        while True:  # the DAG processor parses the DAGs folder after start-up
            try:
                self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
                break
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(3)
        run_id = f"rest__{logical_date}"
        self.api(
            "POST",
            f"/dags/{dag_id}/dagRuns",
            {"dag_run_id": run_id, "logical_date": f"{logical_date}T00:00:00Z"},
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(5)
        raise AssertionError(f"{dag_id} {run_id} did not finish in {RUN_TIMEOUT_S} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]


@pytest.fixture(scope="module")
def deployment(postgres_dsn: str, tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    home = root / "state"
    metadata = postgres_database(postgres_dsn, "airflow_meta")
    # The bundled sample, its locks on the database every worker reaches.
    profile = yaml.safe_load(SAMPLE_PROFILE_PATH.read_text())
    profile["locks"] = {"backend": "postgres", "dsn": postgres_dsn, "timeout_s": 1200}
    (root / "profile.yaml").write_text(yaml.safe_dump(profile))
    (root / "identity").mkdir()
    (root / "identity" / "worker_identity.py").write_text(IDENTITY)
    broker_port, api_port = free_port(), free_port()
    env = airflow_environment(
        load_config(root / "profile.yaml", {"state_dir": str(home)}), str(root / "profile.yaml")
    )
    env |= {
        "RECSYS_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata,  # psycopg 3 is async as well: no asyncpg
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_identity.name",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW_CONN_RECSYS_SPARK": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "PYTHONPATH": os.pathsep.join([str(root / "identity"), env.get("PYTHONPATH", "")]),
    }
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", None)  # SQLite's, not PostgreSQL's
    recsys("airflow", "db", "migrate", env=env)
    processes = []
    try:
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        processes.append(
            subprocess.Popen(
                [
                    redis,
                    "--port",
                    str(broker_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=(root / "redis.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        for component in (["scheduler"], ["dag-processor"]):
            processes.append(
                subprocess.Popen(
                    [AIRFLOW, *component],
                    env=env,
                    stdout=(root / f"{component[0]}.log").open("w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for worker in WORKERS:
            folder = root / worker  # a working folder of its own, as on another machine
            folder.mkdir()
            processes.append(
                subprocess.Popen(
                    [AIRFLOW, "celery", "worker", "--celery-hostname", f"{worker}@%h", "--concurrency", "1"],
                    env=env | {"RECSYS_TEST_WORKER": worker},
                    cwd=folder,
                    stdout=(root / f"{worker}.log").open("w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        processes.append(
            start(
                [AIRFLOW, "api-server", "--port", str(api_port)],
                env,
                f"http://127.0.0.1:{api_port}/api/v2/monitor/health",
                root / "api-server.log",
            )
        )
        yield Deployment(env, api_port)
    finally:
        for process in reversed(processes):
            stop(process)


def test_the_weekly_then_the_nightly_run_on_two_celery_workers(deployment: Deployment) -> None:
    weekly = deployment.run("recsys_weekly", "1998-04-23")
    weekly_tasks = deployment.task_instances("recsys_weekly", weekly["dag_run_id"])
    assert weekly["state"] == "success", {row["task_id"]: row["state"] for row in weekly_tasks}
    assert {row["task_id"] for row in weekly_tasks if row["state"] == "success"} == set(WEEKLY_TASKS)
    nightly = deployment.run("recsys_nightly", "1998-04-23")
    nightly_tasks = deployment.task_instances("recsys_nightly", nightly["dag_run_id"])
    assert nightly["state"] == "success", {row["task_id"]: row["state"] for row in nightly_tasks}
    assert {row["task_id"] for row in nightly_tasks if row["state"] == "success"} == set(NIGHTLY_TASKS)
    # The weekly's tasks ran on both workers (its branches run side by side).
    assert {row["hostname"] for row in weekly_tasks} == set(WORKERS)

    status = json.loads(recsys("status", "--json", env=deployment.env).stdout)
    assert status["kind"] == "refresh" and status["data_window"]["end"].startswith("1998-04-23")
    for worker in WORKERS:
        doctor = subprocess.run(
            [RECSYS, "doctor"],
            env=deployment.env | {"RECSYS_TEST_WORKER": worker},
            cwd=Path(deployment.env["RECSYS_HOME"]).parent / worker,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "postgres at" in doctor.stdout
