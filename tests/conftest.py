"""Shared fixtures: a small local Spark session and configurations over temporary state folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from recsys_pipeline.config import PipelineConfig, load_config  # noqa: E402
from recsys_pipeline.runs import RunContext  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TEST_SPARK_CONF = {"spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"}


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from recsys_pipeline.spark import spark_session

    config = load_config(overrides={"spark.conf": TEST_SPARK_CONF})
    session = spark_session(config, "recsys-tests", master="local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def movielens() -> Any:
    """The bundled MovieLens-100k ratings as a binary (users x items) CSR matrix, ids minus one."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    ratings = pd.read_csv(
        load_config().source.path, sep="\t", names=["user", "item", "rating", "ts"], usecols=[0, 1]
    )
    return sp.csr_matrix(
        (np.ones(len(ratings), np.float32), (ratings.user - 1, ratings.item - 1)),
        shape=(ratings.user.max(), ratings.item.max()),
    )


ConfigFactory = Callable[..., PipelineConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """The project config with its state under tmp_path and any dotted overrides applied."""

    def factory(**overrides: Any) -> PipelineConfig:
        base: dict[str, Any] = {"state_dir": str(tmp_path / "state"), "spark.conf": TEST_SPARK_CONF}
        base.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_config(overrides=base)

    return factory


def run_weekly_stages(spark: Any, run: RunContext) -> None:
    """Every stage of the weekly pipeline up to validation, in process (nothing published)."""
    from recsys_pipeline.als import run_training
    from recsys_pipeline.evaluate import run_evaluation
    from recsys_pipeline.events import run_ingest
    from recsys_pipeline.index import run_index
    from recsys_pipeline.interactions import run_interactions
    from recsys_pipeline.recommendations import run_batch_recommendations
    from recsys_pipeline.validation import run_validation

    run_ingest(spark, run)
    run_interactions(spark, run)
    run_training(spark, run)
    run_evaluation(run)
    run_index(run)
    run_batch_recommendations(run)
    run_validation(run)


@pytest.fixture(scope="session")
def weekly_run(spark, tmp_path_factory) -> RunContext:
    """Every stage of the weekly pipeline, in process, on the bundled sample (nothing published yet)."""
    state = tmp_path_factory.mktemp("state")
    config = load_config(overrides={"state_dir": str(state), "spark.conf": TEST_SPARK_CONF})
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__test")
    run_weekly_stages(spark, run)
    return run
