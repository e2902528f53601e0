"""The weekly DAG on a Spark standalone cluster, by configuration only: a master and one worker from
the pyspark package's ``spark-class`` on loopback, ``spark.master: spark://127.0.0.1:PORT``."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from recsys_pipeline.config import PROJECT_ROOT
from tests.conftest import free_port, start, stop


def spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


@pytest.mark.e2e
def test_the_weekly_dag_runs_its_spark_stages_on_a_standalone_cluster(tmp_path: Path) -> None:
    port, master_ui, worker_ui = free_port(), free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "RECSYS"))}
    env |= {"SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(tmp_path / "logs")}
    master = start(
        [
            spark_class(),
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(master_ui),
        ],
        env,
        f"http://127.0.0.1:{master_ui}/json/",
        tmp_path / "master.log",
    )
    try:
        worker = start(
            [
                spark_class(),
                "org.apache.spark.deploy.worker.Worker",
                f"spark://127.0.0.1:{port}",
                "--host",
                "127.0.0.1",
                "--cores",
                "2",
                "--memory",
                "3g",
                "--webui-port",
                str(worker_ui),
                "--work-dir",
                str(tmp_path / "work"),
            ],
            env,
            f"http://127.0.0.1:{worker_ui}/json/",
            tmp_path / "worker.log",
        )
        try:
            recsys = [
                str(Path(sys.executable).parent / "recsys"),
                "--set",
                f"spark.master=spark://127.0.0.1:{port}",
            ]
            run_env = env | {"RECSYS_HOME": str(tmp_path / "state")}
            subprocess.run(
                [*recsys, "airflow", "db", "migrate"], env=run_env, check=True, capture_output=True
            )
            result = subprocess.run(
                [*recsys, "airflow", "dags", "test", "recsys_weekly", "1998-04-23"],
                env=run_env,
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{master_ui}/json/", timeout=10) as response:
                cluster = json.load(response)
        finally:
            stop(worker)
    finally:
        stop(master)
    # Each Spark task's application carries its job's name (recsys-ingest-events:<interval>, ...).
    finished = " ".join(app["name"] for app in cluster["completedapps"])
    assert all(job in finished for job in ("ingest-events", "build-interactions", "train-als")), finished
    assert all(app["state"] == "FINISHED" for app in cluster["completedapps"])
