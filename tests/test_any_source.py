"""`make run` on another ratings source and on a Spark standalone cluster, both by configuration only.

The source is configured with documented `source` fields only: a CSV with a header and half-star
ratings (180 MovieLens users, their ratings of the 250 most rated films, half a star off every rating
with an odd timestamp; see fixtures/README.md). The cluster is a master and one worker from the pyspark
package's ``spark-class`` on loopback, named by ``spark.master: spark://127.0.0.1:PORT``.
"""

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_pipeline.config import PROJECT_ROOT, load_config
from tests.conftest import free_port, start, stop

FIXTURES = Path(__file__).parent / "fixtures"


def spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


@contextmanager
def standalone_cluster(folder: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(master URL, master's JSON status URL) of a master and one 2-core worker on loopback."""
    port, master_ui, worker_ui = free_port(), free_port(), free_port()
    status = f"http://127.0.0.1:{master_ui}/json/"
    master_command = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port)]
    master = start(
        [spark_class(), *master_command, "--webui-port", str(master_ui)], env, status, folder / "m.log"
    )
    try:
        worker_command = [
            "org.apache.spark.deploy.worker.Worker",
            f"spark://127.0.0.1:{port}",
            "--host",
            "127.0.0.1",
        ]
        worker = start(
            [
                spark_class(),
                *worker_command,
                "--cores",
                "2",
                "--memory",
                "3g",
                "--webui-port",
                str(worker_ui),
                "--work-dir",
                str(folder / "work"),
            ],
            env,
            f"http://127.0.0.1:{worker_ui}/json/",
            folder / "w.log",
        )
        try:
            yield f"spark://127.0.0.1:{port}", status
        finally:
            stop(worker)
    finally:
        stop(master)


@pytest.mark.e2e
@pytest.mark.slow  # a Spark master and worker, then `make run` through them: about 2 minutes
def test_make_run_on_a_half_star_csv_on_a_standalone_cluster_publishes_a_champion(tmp_path: Path) -> None:
    # A profile of the user's own: their events only. Nothing of the bundled sample's description
    # (its u.item metadata) comes with it, so content stays off as the defaults say.
    config: dict[str, Any] = {
        "source": {
            "name": "half-star-ratings",
            "path": str(FIXTURES / "half_star_ratings.csv"),
            "format": "csv",
            "header": True,
            "mapping": {
                "user_id": "userId",
                "item_id": "movieId",
                "value": "rating",
                "timestamp": "timestamp",
            },
            "default_event_type": "rating",
        }
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "RECSYS"))}
    env |= {"SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(tmp_path / "logs")}
    with standalone_cluster(tmp_path, env) as (master_url, master_status):
        config["spark"] = {"master": master_url}
        config_path = tmp_path / "pipeline.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env |= {"RECSYS_CONFIG": str(config_path), "RECSYS_HOME": str(tmp_path / "state")}
        result = subprocess.run(
            ["make", "-s", "run", "DATE=1998-04-23"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        with urllib.request.urlopen(master_status, timeout=10) as response:
            cluster = json.load(response)
    # The Spark task's application carries its job's name (recsys-ingest_and_build_interactions:
    # <interval>); training with implicit starts none.
    finished = sorted(app["name"].split(":")[0] for app in cluster["completedapps"])
    assert finished == ["recsys-ingest_and_build_interactions"], finished
    assert all(app["state"] == "FINISHED" for app in cluster["completedapps"])
    assert "champion" in result.stdout and "ndcg_at_10" in result.stdout

    status = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "recsys"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    published = json.loads(status.stdout)
    metrics = published["metrics"]
    assert published["version"] == 1 and published["tags"]["source"] == "half-star-ratings"
    evaluation = load_config(config_path).evaluation
    assert metrics["eval_users"] >= evaluation.min_users
    assert metrics["ndcg_at_10_ci_low"] < metrics["ndcg_at_10"] < metrics["ndcg_at_10_ci_high"]
    assert metrics["lift_over_baseline_ndcg_at_10_p"] <= 1 - evaluation.confidence
    # Half stars weighed between their neighbours instead of dropping out (no zero-confidence pairs).
    assert metrics["dropped_pairs_zero_confidence"] == 0
