"""Publishing and consuming over HTTP: a real `mlflow server` and `recsys serve` on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from recsys_pipeline import tracking
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.serving import Recommender
from recsys_pipeline.stages.publish import run_promotion, run_publish
from tests.conftest import free_port, invocations, postgres_database, start, stop

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def mlflow_server(backend_store: str, root: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free loopback port, its artifacts served over HTTP from ``root``:
    (the process, its URI)."""
    port = free_port()
    process = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_store,
            "--serve-artifacts",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        dict(os.environ),
        f"http://127.0.0.1:{port}/health",
        root / "server.log",
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow_server")
    process, uri = mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root)
    yield uri
    stop(process)


def tracked_by(run: RunContext, tracking_uri: str) -> RunContext:
    """The same run, publishing to the tracking server at ``tracking_uri``."""
    mlflow_config = run.config.mlflow.model_copy(update={"tracking_uri": tracking_uri})
    config = run.config.model_copy(update={"mlflow": mlflow_config})
    return RunContext(config, run.dag_id, run.run_id, run.interval_start, run.interval_end)


def test_publish_promote_and_consume_through_a_tracking_server(own_weekly_run, tracking_server) -> None:
    run = tracked_by(own_weekly_run, tracking_server)
    config = run.config
    version = run_publish(run)
    assert run_publish(run) == version
    run_promotion(run, version)
    status = Registry(config).champion_status()
    assert status["version"] == int(version)
    assert Registry(config).list_versions()[0]["aliases"] == ["champion"]

    user_id = run.artifacts.interactions.ids("users")[5]
    with tracking.fluent(config):
        model = mlflow.pyfunc.load_model(f"models:/{config.mlflow.model_name}@champion")
    predicted = model.predict(pd.DataFrame({"user_id": [user_id], "k": [5]}))
    expected = Recommender.from_registry(config=config).recommend(user_id, 5)
    pd.testing.assert_frame_equal(predicted[expected.columns].reset_index(drop=True), expected)


def test_rest_predictions_equal_in_process_predictions(own_weekly_run, tmp_path: Path) -> None:
    version = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, version)
    port = free_port()
    env = {**os.environ, "RECSYS_HOME": str(own_weekly_run.config.state_home)}
    server = start(
        [
            str(BIN / "recsys"),
            "--set",
            f"state_dir={own_weekly_run.config.state_home}",
            "serve",
            "--port",
            str(port),
        ],
        env,
        f"http://127.0.0.1:{port}/ping",
        tmp_path / "serve.log",
    )
    item_ids = list(own_weekly_run.artifacts.interactions.ids("items")[:3])
    try:
        users = [*own_weekly_run.artifacts.interactions.ids("users")[:4], "never-seen"]
        served = invocations(port, [{"user_id": u, "k": 5} for u in users])
        session = invocations(
            port, [{"recent_item_ids": item_ids, "k": 5}, {"recent_item_ids": item_ids, "user_id": users[0]}]
        )
        split = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=json.dumps(
                        {"dataframe_split": {"columns": ["item_id", "k"], "data": [[item_ids[0], 4]]}}
                    ).encode(),
                    headers={"Content-Type": "application/json"},
                ),
                timeout=60,
            ).read()
        )["predictions"]
    finally:
        stop(server)
    recommender = Recommender.from_registry(config=own_weekly_run.config)
    expected_session = pd.concat(
        [recommender.for_session(item_ids, 5), recommender.for_session(item_ids, 10, user_id=users[0])],
        ignore_index=True,
    )
    assert session["item_id"].tolist() == expected_session["item_id"].tolist()
    assert [row["item_id"] for row in split] == recommender.similar(item_ids[0], 4)["item_id"].tolist()
    expected = pd.concat([recommender.recommend(u, 5, unknown="popular") for u in users], ignore_index=True)
    pd.testing.assert_frame_equal(served[expected.columns], expected, check_dtype=False)
    assert served.loc[served["user_id"] == "never-seen", "item_id"].tolist() == list(
        recommender.item_ids[recommender.popular[:5]]
    )


@pytest.mark.slow
@pytest.mark.deploy  # PostgreSQL and an MLflow server on it
def test_a_server_on_postgresql_proxies_artifacts_to_consumers_that_have_only_its_uri(
    own_weekly_run, postgres_dsn, tmp_path: Path
) -> None:
    """MLflow as deployed (issue #34, item 2): its store on PostgreSQL, artifacts served over HTTP
    (``mlflow-artifacts:``); the pipeline publishes and promotes through it, and the CLI and the
    client consume from a state folder that has only the tracking URI."""
    from recsys_pipeline.client import RecsysClient
    from recsys_pipeline.config import RegistryConfig
    from tests.conftest import run_recsys

    server, uri = mlflow_server(postgres_database(postgres_dsn, "mlflow_store"), tmp_path)
    try:
        run = tracked_by(own_weekly_run, uri)
        config = run.config
        version = run_publish(run)
        run_promotion(run, version)
        registry = Registry(config)
        assert registry.client.get_run(registry.version(version).run_id).info.artifact_uri.startswith(
            "mlflow-artifacts:"
        )
        user = str(run.artifacts.interactions.ids("users")[7])
        expected = Recommender.from_registry(config=config).recommend(user, 5)["item_id"].tolist()

        fresh = tmp_path / "consumer"  # no path to the server's artifact folder, no state of its own
        answered = run_recsys(
            "--set",
            f"state_dir={fresh / 'cli'}",
            "--set",
            f"mlflow.tracking_uri={uri}",
            "recommend",
            "--user-id",
            user,
            "-k",
            "5",
            "--json",
        )
        assert answered.returncode == 0, answered.stderr
        assert [row["item_id"] for row in json.loads(answered.stdout)] == expected
        client = RecsysClient(RegistryConfig(state_dir=fresh / "service", mlflow={"tracking_uri": uri}))
        assert client.version == version and client.recommend(user, 5)["item_id"].tolist() == expected
    finally:
        stop(server)
