"""``recsys doctor`` says, one line per check, whether this machine can run the pipeline as
configured, and exits 1 naming what is broken (issue #34, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_pipeline.spark import class_archive
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.deploy]  # Airflow's CLI, once per check
RECSYS = str(Path(sys.executable).parent / "recsys")


def recsys(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "RECSYS"))}
    return subprocess.run(
        [RECSYS, "--set", f"state_dir={state}", *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_doctor_passes_a_working_setup_and_names_each_broken_part(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert recsys(state, "airflow", "db", "migrate").returncode == 0
    healthy = recsys(state, "doctor")
    lines = healthy.stdout.splitlines()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    checks = {line[6:26].strip(): line[:4].strip() for line in lines}
    assert checks == {
        "state folder": "OK",
        "locks": "OK",
        "java": "OK",
        "packages": "OK",
        "spark": "OK",
        # `make init` makes it; a machine without one works, each Spark job starting later.
        "spark archive": "OK" if class_archive().is_file() else "WARN",
        "mlflow": "OK",
        "airflow pool": "OK",
        "airflow spark conn": "OK",
        "airflow alerts conn": "WARN",  # no alert connection: alerts are only logged
    }, healthy.stdout

    closed = free_port()
    broken = recsys(
        state,
        "--set",
        f"spark.master=spark://127.0.0.1:{closed}",
        "--set",
        f"mlflow.tracking_uri=http://127.0.0.1:{closed}",
        "--set",
        "spark.pool=no_such_pool",
        "doctor",
    )
    assert broken.returncode == 1
    failed = {line[6:26].strip(): line for line in broken.stdout.splitlines() if line.startswith("FAIL")}
    assert set(failed) == {"spark", "mlflow", "airflow pool"}, broken.stdout
    assert f"spark://127.0.0.1:{closed}: no answer" in failed["spark"]
    assert "no_such_pool" in failed["airflow pool"]
