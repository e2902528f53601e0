"""Credentials never reach a log, param, tag, artifact or run snapshot (issue #14, item 9).

A canary secret goes in through each route a user has: the config file, a CLI override, a DAG
run's ``config_overrides``, and the environment variables MLflow reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_pipeline.config import ConfigError, load_config
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.publish import run_promotion, run_publish
from tests.conftest import run_recsys

CANARY = "canary-7f3e9c"
WITH_CREDENTIALS = f"http://bob:{CANARY}@127.0.0.1:5999"


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    yaml_file = tmp_path / "pipeline.yaml"
    yaml_file.write_text(
        (Path(__file__).resolve().parents[2] / "conf" / "pipeline.yaml")
        .read_text()
        .replace("tracking_uri: null", f"tracking_uri: {WITH_CREDENTIALS}")
    )
    routes = [
        lambda: load_config(yaml_file),
        lambda: load_config(overrides={"spark.master": f"k8s://https://bob:{CANARY}@api:443"}),
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
    assert not (tmp_path / "state").exists() or not files_holding(tmp_path / "state", CANARY)


def test_the_cli_refuses_credentials_in_one_line_without_them(tmp_path: Path) -> None:
    result = run_recsys(
        "--set", f"state_dir={tmp_path}", "--set", f"mlflow.tracking_uri={WITH_CREDENTIALS}", "status"
    )
    assert result.returncode == 1 and "carries credentials" in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_credentials_from_the_environment_stay_out_of_every_file_and_log(
    own_weekly_run, monkeypatch, capfd, caplog
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", CANARY)
    run_promotion(own_weekly_run, run_publish(own_weekly_run))
    assert files_holding(own_weekly_run.config.state_home, CANARY) == []
    out, err = capfd.readouterr()
    assert CANARY not in out + err + caplog.text
