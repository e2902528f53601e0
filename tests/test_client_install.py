"""A service installs the client alone (issue #33, item 1): ``pip install 'recsys-pipeline[client]'``
brings no Spark, Airflow, Great Expectations or implicit, and the client it gets verifies and
serves the champion from nothing but the registry and a cache folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from recsys_pipeline.config import PROJECT_ROOT
from recsys_pipeline.serving import Recommender
from recsys_pipeline.stages.publish import run_promotion, run_publish

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVICE = """
import importlib.util, json, sys
from recsys_pipeline.client import RecsysClient
from recsys_pipeline.config import RegistryConfig

client = RecsysClient(RegistryConfig(state_dir=sys.argv[1]))
print(json.dumps({
    "installed": [m for m in ("pyspark", "airflow", "great_expectations", "implicit")
                  if importlib.util.find_spec(m)],
    "version": client.version,
    "items": client.recommend(sys.argv[2], 5)["item_id"].tolist(),
}))
"""


def test_the_client_installs_without_the_pipeline_and_serves_the_champion(own_weekly_run, tmp_path) -> None:
    version = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, version)
    # The package as it would be published: its sources and metadata only (building in the
    # repository would leave build folders there).
    source = tmp_path / "source"
    shutil.copytree(
        PROJECT_ROOT / "recsys_pipeline",
        source / "recsys_pipeline",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    # The versions this environment runs (MLflow's among them, whose store the test shares).
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "constraints.txt").write_text(frozen)
    service = tmp_path / "service"
    subprocess.run([sys.executable, "-m", "venv", str(service)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RECSYS_HOME")}
    installed = subprocess.run(
        [
            str(service / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(tmp_path / "constraints.txt"),
            f"{source}[client]",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    user = str(own_weekly_run.artifacts.interactions.ids("users")[3])
    answered = subprocess.run(
        [str(service / "bin" / "python"), "-c", SERVICE, str(own_weekly_run.config.state_home), user],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    answer = json.loads(answered.stdout.strip().splitlines()[-1])
    expected = Recommender.from_registry(config=own_weekly_run.config).recommend(user, 5, unknown="popular")
    assert answer == {"installed": [], "version": version, "items": expected["item_id"].tolist()}
