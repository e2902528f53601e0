"""A task killed with SIGKILL mid-way is retried to one correct result (issue #14, item 11).

Airflow retries every task (``default_args()``: 2 retries, exponential backoff); this test plays the
retry by hand: a process runs the stage, is killed at its worst moment, and the stage runs again.
This file is also the worker (``python this_file STATE STAGE``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_pipeline import tracking
from recsys_pipeline.config import PROJECT_ROOT, load_config
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.publish import run_promotion, run_publish
from recsys_pipeline.stages.train import run_training

pytestmark = pytest.mark.e2e
# Long enough to be killed mid-fit (a few seconds on the sample), no sweep before it.
SLOW_TRAINING = {"als.iterations": 400, "als.sweep": None}
FIT_STARTED = "fit-started"  # the worker touches this in its state folder as ALS starts fitting


def context(state: str, **overrides: object) -> RunContext:
    config = load_config(overrides={"state_dir": state, **overrides})
    return RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__test")


def start_worker(state: Path, stage: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, str(state), stage],
        cwd=PROJECT_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )


def kill_when(process: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, "the worker finished before it could be killed"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_training_killed_mid_way_is_retried_to_a_complete_model(own_weekly_run, tmp_path: Path) -> None:
    state = own_weekly_run.config.state_home
    run = context(str(state), **SLOW_TRAINING)
    before = run.artifacts.served.embeddings()
    worker = start_worker(state, "train", tmp_path / "train.log")
    # Killed while ALS fits, a second into a fit of several: the run's model folder must still be
    # the earlier, complete one.
    kill_when(worker, lambda: (state / FIT_STARTED).exists() and time.sleep(1) is None)
    assert worker.returncode == -signal.SIGKILL
    assert (run.artifacts.served.embeddings().item_factors == before.item_factors).all()
    run_training(run)  # the retry
    assert run.artifacts.trained.trained_params().iterations == SLOW_TRAINING["als.iterations"]
    assert len(run.artifacts.trained.training_losses()) == SLOW_TRAINING["als.iterations"]


def test_publish_killed_mid_way_is_retried_to_one_version(own_weekly_run, tmp_path: Path) -> None:
    state = own_weekly_run.config.state_home
    run = context(str(state))
    client = tracking.client(run.config)

    def run_logged() -> bool:
        experiment = client.get_experiment_by_name(run.config.mlflow.experiment)
        return experiment is not None and bool(client.search_runs([experiment.experiment_id]))

    worker = start_worker(state, "publish", tmp_path / "publish.log")
    kill_when(worker, run_logged)  # inside the MLflow run: model logging under way
    version = run_publish(run)  # the retry
    run_promotion(run, version)
    name = run.config.mlflow.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [version] and versions[0].status == "READY"
    assert Registry(run.config).champion_status()["version"] == int(version)
    assert run_publish(run) == version  # a further retry finds it


if __name__ == "__main__":
    state_dir, stage = sys.argv[1:3]
    if stage == "train":
        from recsys_pipeline.als import ImplicitTrainer

        fit = ImplicitTrainer.fit

        def fit_and_say_so(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            (Path(state_dir) / FIT_STARTED).touch()
            return fit(self, *args, **kwargs)

        ImplicitTrainer.fit = fit_and_say_so  # type: ignore[method-assign]
        run_training(context(state_dir, **SLOW_TRAINING))
    else:
        run_publish(context(state_dir))
