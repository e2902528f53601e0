"""Credentials never reach a log, param, tag, artifact, run snapshot or Airflow field (issues #14,
item 9, and #31, items 3 and 4).

A canary secret goes in through each route a user has: the config file, a CLI override, a DAG
run's ``config_overrides`` (flat or nested), a secret Spark setting, a query string, an alert
connection's login, and the environment variables MLflow reads.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
import zstandard

from recsys_pipeline.config import (
    DEFAULT_CONFIG_PATH,
    PROJECT_ROOT,
    SAMPLE_PROFILE_PATH,
    ConfigError,
    PipelineConfig,
    layered,
    load_config,
)
from recsys_pipeline.pipelines import WEEKLY
from recsys_pipeline.redaction import REDACTED, MissingSecretError, redact_text
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.publish import run_promotion, run_publish
from recsys_pipeline.trigger import run_overrides
from tests.conftest import run_recsys

CANARY = "canary-7f3e9c"
WITH_CREDENTIALS = f"http://bob:{CANARY}@127.0.0.1:5999"
SECRET_SPARK_SETTING = "spark.hadoop.fs.s3a.secret.key"


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def config_file_with(tmp_path: Path, old: str, new: str) -> Path:
    """A profile: the defaults with ``old`` replaced by ``new``, and the bundled sample's data."""
    path = tmp_path / "pipeline.yaml"
    text = DEFAULT_CONFIG_PATH.read_text()
    assert old in text
    sample = yaml.safe_load(SAMPLE_PROFILE_PATH.read_text())
    path.write_text(yaml.safe_dump(layered(yaml.safe_load(text.replace(old, new)), sample)))
    return path


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    yaml_file = config_file_with(tmp_path, "tracking_uri: null", f"tracking_uri: {WITH_CREDENTIALS}")
    routes = [
        lambda: load_config(yaml_file),
        lambda: load_config(overrides={"spark.master": f"k8s://https://bob:{CANARY}@api:443"}),
        # A token in the query string is a credential too.
        lambda: load_config(overrides={"mlflow.tracking_uri": f"https://mlflow.internal/?token={CANARY}"}),
        lambda: load_config(
            overrides={"mlflow.tracking_uri": f"https://h/x?a=1&X-Amz-Security-Token={CANARY}"}
        ),
        lambda: RunContext.open(
            "recsys_weekly",
            "manual__canary",
            "1998-04-16",
            "1998-04-23",
            overrides={"state_dir": str(tmp_path / "state"), "mlflow.tracking_uri": WITH_CREDENTIALS},
        ),
    ]
    for route in routes:
        with pytest.raises(ConfigError, match="carries credentials") as refused:
            route()
        assert CANARY not in str(refused.value)
    assert not (tmp_path / "state").exists()  # refused before the run wrote anything


def test_one_rule_redacts_user_info_secret_query_values_and_secret_assignments() -> None:
    text = (
        f"could not reach https://bob:{CANARY}@h:1/p?db=x&password={CANARY}#f and "
        f"spark.hadoop.fs.s3a.secret.key={CANARY}, token: '{CANARY}'"
    )
    redacted = redact_text(text)
    assert CANARY not in redacted
    assert "https://" in redacted and "h:1/p?db=x&password=" + REDACTED in redacted
    # What is not secret stays readable, so a message still says what failed.
    assert redact_text("http://h:5000/?experiment=7 and alpha=5") == "http://h:5000/?experiment=7 and alpha=5"


@pytest.mark.e2e
def test_the_cli_refuses_credentials_in_one_line_without_them(tmp_path: Path) -> None:
    result = run_recsys(
        "--set", f"state_dir={tmp_path}", "--set", f"mlflow.tracking_uri={WITH_CREDENTIALS}", "status"
    )
    assert result.returncode == 1 and "carries credentials" in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_a_secret_spark_setting_is_recorded_redacted_and_still_reaches_every_task(tmp_path: Path) -> None:
    state = {"state_dir": str(tmp_path / "state")}
    secret = {"spark.conf": {SECRET_SPARK_SETTING: CANARY, "spark.sql.shuffle.partitions": "4"}}

    def task(overrides: dict) -> RunContext:
        return RunContext.open("recsys_weekly", "manual__s", "1998-04-16", "1998-04-23", overrides=overrides)

    first = task({**state, **secret})
    assert first.config.spark.conf[SECRET_SPARK_SETTING] == CANARY
    assert files_holding(tmp_path / "state", CANARY) == []
    recorded = json.loads(next((tmp_path / "state").rglob("run.json")).read_text())["config"]["spark"]["conf"]
    assert recorded == {SECRET_SPARK_SETTING: REDACTED, "spark.sql.shuffle.partitions": "4"}
    # A later task of the run reads the snapshot and takes the secret from its own configuration.
    later = task({**state, **secret, "als.factors": 3})
    assert later.config.spark.conf[SECRET_SPARK_SETTING] == CANARY and later.config.als.factors != 3
    # A secret that is gone by then is named, never guessed.
    with pytest.raises(MissingSecretError, match=f"spark.conf.{SECRET_SPARK_SETTING}") as missing:
        task({**state, "spark.conf": {"spark.sql.shuffle.partitions": "4"}})
    assert CANARY not in str(missing.value)
    # What Airflow renders and stores for a Spark task holds no secret setting.
    from recsys_pipeline.orchestration import spark_job

    operator = spark_job(first.config, WEEKLY, "ingest_events")
    assert SECRET_SPARK_SETTING not in operator.conf and operator.conf["spark.sql.shuffle.partitions"] == "4"


def test_a_published_run_logs_and_bundles_secret_settings_redacted(own_weekly_run, capfd, caplog) -> None:
    spark = own_weekly_run.config.spark.model_copy(update={"conf": {SECRET_SPARK_SETTING: CANARY}})
    run = replace(own_weekly_run, config=own_weekly_run.config.model_copy(update={"spark": spark}))
    run_promotion(run, run_publish(run))
    assert files_holding(run.config.state_home, CANARY) == []
    (param,) = sqlite3.connect(run.config.state_home / "mlflow" / "mlflow.db").execute(
        "select value from params where key = ?", (f"spark.conf.{SECRET_SPARK_SETTING}",)
    )
    assert param == (REDACTED,)
    out, err = capfd.readouterr()
    assert CANARY not in out + err + caplog.text


def test_credentials_from_the_environment_stay_out_of_every_file_and_log(
    own_weekly_run, monkeypatch, capfd, caplog
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", CANARY)
    run_promotion(own_weekly_run, run_publish(own_weekly_run))
    assert files_holding(own_weekly_run.config.state_home, CANARY) == []
    out, err = capfd.readouterr()
    assert CANARY not in out + err + caplog.text


def test_a_dag_run_may_override_only_the_allowlist_flat_or_nested() -> None:
    config = load_config()
    for asked in (
        {"mlflow.tracking_uri": WITH_CREDENTIALS},
        {"mlflow": {"tracking_uri": WITH_CREDENTIALS}},
        {"state_dir": "/elsewhere"},
        {"source.path": "/etc"},
        {"content": {"map": {"ridge": 2.0}, "sentence": {"model_dir": "/models"}}},
    ):
        with pytest.raises(ConfigError, match="config_overrides may not set") as refused:
            run_overrides({"config_overrides": asked}, config)
        assert CANARY not in str(refused.value)
    assert run_overrides({"config_overrides": {"als": {"factors": 8}, "drift.k": 5}}, config) == {
        "als": {"factors": 8},
        "drift.k": 5,
    }
    # The allowlist is the config's, and it can never open paths or servers.
    narrow = config.model_copy(update={"run_overrides_allowed": ["als.factors"]})
    with pytest.raises(ConfigError, match="may not set als.alpha"):
        run_overrides({"config_overrides": {"als.alpha": 3.0}}, narrow)
    for field in ("mlflow", "content", "spark.conf", "source.path"):
        with pytest.raises(ValueError, match="may not be overridden by a DAG run"):
            PipelineConfig.model_validate({**config.model_dump(), "run_overrides_allowed": [field]})


@pytest.mark.parametrize("dag_id", ["recsys_weekly", "recsys_nightly"])
def test_the_trigger_form_refuses_other_fields_naming_the_field_only(dag_id: str) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import ParamValidationError

    dag = DagBag(dag_folder=str(PROJECT_ROOT / "dags")).dags[dag_id]
    overrides = dag.params.get_param("config_overrides")
    for asked in (
        {"als.factors": 32, "mlflow.tracking_uri": WITH_CREDENTIALS},
        {"mlflow": {"tracking_uri": WITH_CREDENTIALS}},
    ):
        with pytest.raises(ParamValidationError) as refused:
            overrides.resolve(value=asked)
        assert "mlflow" in str(refused.value) and CANARY not in str(refused.value)
    assert overrides.resolve(value={"als.factors": 32, "drift.k": 5})["als.factors"] == 32


class AlertHook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str | None, dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers.get("Authorization"), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_an_alert_connection_login_goes_in_a_header_and_never_in_a_message(monkeypatch, caplog) -> None:
    from recsys_pipeline.orchestration import failure_notifier

    server = http.server.HTTPServer(("127.0.0.1", 0), AlertHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class TaskInstance:
        task_id, dag_id = "train", "recsys_weekly"

    context = {
        "task_instance": TaskInstance(),
        "run_id": "manual__x",
        "exception": ValueError(f"cannot reach http://bob:{CANARY}@h/"),
    }
    connection = {"conn_type": "http", "host": "127.0.0.1", "login": "bob", "password": CANARY}
    monkeypatch.setenv("AIRFLOW_CONN_RECSYS_ALERTS", json.dumps({**connection, "port": server.server_port}))
    failure_notifier().notify(context)
    server.shutdown()
    ((authorization, body),) = AlertHook.received
    assert authorization == "Basic " + base64.b64encode(f"bob:{CANARY}".encode()).decode()
    assert CANARY not in body["text"] and "cannot reach http://" in body["text"]
    # A connection urllib cannot parse (a port out of range) fails the alert without showing its login.
    monkeypatch.setenv("AIRFLOW_CONN_RECSYS_ALERTS", json.dumps({**connection, "port": 99999}))
    with caplog.at_level(logging.WARNING):
        failure_notifier().notify(context)
    assert "could not post the failure alert" in caplog.text and CANARY not in caplog.text


@pytest.mark.e2e
@pytest.mark.slow
def test_a_weekly_dag_run_with_a_secret_spark_setting_leaves_it_in_no_file_of_the_state(
    tmp_path: Path,
) -> None:
    """The measured fault: `make run` with an object-store key in ``spark.conf`` put it in MLflow's
    params, the run's lineage (folder and bundle) and Airflow's rendered task fields."""
    from recsys_pipeline.cli import airflow_environment

    home = tmp_path / "home"
    config_file = config_file_with(
        tmp_path,
        "  conf:\n    spark.sql.shuffle",
        f"  conf:\n    {SECRET_SPARK_SETTING}: {CANARY}\n    spark.sql.shuffle",
    )
    env = airflow_environment(load_config(config_file, {"state_dir": str(home)}), None) | {
        "RECSYS_HOME": str(home),
        "RECSYS_CONFIG": str(config_file),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW_CONN_RECSYS_SPARK": json.dumps({"conn_type": "spark", "host": "local[2]"}),
    }
    recsys = str(Path(sys.executable).parent / "recsys")
    subprocess.run(
        [recsys, "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=600
    )
    result = subprocess.run(
        [recsys, "airflow", "dags", "test", "recsys_weekly", "1998-04-23"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert CANARY not in result.stdout + result.stderr
    assert files_holding(home, CANARY) == []
    # Spark had it: its event logs (zstd, so not read by the grep above) name the setting, with the
    # value redacted by the same rule.
    event_logs = b"".join(
        zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True).read()
        for path in (home / "spark-events").rglob("*.zstd")
    )
    assert f'"{SECRET_SPARK_SETTING}":"{REDACTED}"'.encode() in event_logs
    assert CANARY.encode() not in event_logs
