"""A version is promoted only on its own gates, and a registry that cannot be read fails closed
(issue #14, items 5 and 6)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from recsys_pipeline import registry
from recsys_pipeline.artifacts import Gate
from recsys_pipeline.registry import Registry
from recsys_pipeline.stages import publish
from recsys_pipeline.stages.publish import run_promotion, run_publish
from tests.conftest import another_run_of, free_port, run_recsys


def test_a_rerun_with_another_config_is_another_version_promoted_only_on_its_own_gates(
    own_weekly_run,
) -> None:
    first = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, first)
    # The same interval and input, run again with another config whose evaluation failed.
    changed = own_weekly_run.config.model_copy(
        update={"als": own_weekly_run.config.als.model_copy(update={"factors": 8})}
    )
    rerun = another_run_of(own_weekly_run, "manual__rerun", changed)
    rerun.artifacts.write_gate(
        Gate.EVALUATION, False, ["ndcg_at_10=0.1 does not beat baseline_ndcg_at_10=0.2"]
    )
    second = run_publish(rerun)
    assert second != first, "another config must not reuse the earlier version"
    with pytest.raises(registry.GateFailedError, match="evaluation"):
        run_promotion(rerun, second)
    # Neither run can promote the other's version on its own gates.
    with pytest.raises(registry.GateFailedError, match=f"version {first} was not published by this run"):
        run_promotion(rerun, first)
    status = Registry(own_weekly_run.config).champion_status()
    assert status["version"] == int(first) and status["tags"]["gates_passed"] == "true"


def test_an_unreachable_registry_fails_closed_instead_of_meaning_no_champion(
    make_config, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = make_config(mlflow__tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(registry.RegistryUnavailableError, match="could not be read"):
        Registry(config).alias_version(registry.CHAMPION)
    with pytest.raises(registry.RegistryUnavailableError):
        # What evaluation and drift ask before comparing.
        Registry(config).reference_version(datetime(1998, 4, 23, tzinfo=UTC))


def test_a_missing_alias_on_a_working_registry_is_simply_absent(make_config) -> None:
    assert Registry(make_config()).alias_version(registry.CHAMPION) is None


@pytest.mark.e2e
def test_the_cli_says_the_registry_is_unreachable_in_one_line(tmp_path: Path) -> None:
    result = run_recsys(
        "--set",
        f"state_dir={tmp_path}",
        "--set",
        f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
        "status",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("recsys: the model registry at http://127.0.0.1:")
    assert "Traceback" not in result.stderr and "nothing" not in result.stderr.lower()


def test_an_uncommitted_change_to_the_code_is_another_code_version(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "recsys_pipeline"
    shutil.copytree(publish.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(publish, "PACKAGE", copy)
    before = publish.code_version()
    assert before == publish.code_version()
    (copy / "ranking.py").write_text((copy / "ranking.py").read_text() + "\n# changed\n")
    assert publish.code_version() != before
