"""Seconds per ALS iteration: implicit (one process) against Spark MLlib ALS, on one synthetic matrix.

Each backend is fitted twice, with ``few`` and ``many`` iterations; the time per iteration
is the difference divided by the extra iterations, so start-up, data conversion and
partitioning (paid once per fit) do not count as iteration time.
Results: ``nnz``, ``factors``, ``implicit_s_per_iter``, ``spark_s_per_iter``,
``implicit_speedup`` (spark / implicit).
"""

from __future__ import annotations

import time
from typing import Any

import scipy.sparse as sp

from recsys_pipeline.als import train
from recsys_pipeline.config import AlsConfig, load_config
from recsys_pipeline.spark import spark_session
from recsys_pipeline.synthetic import SyntheticSpec, interaction_matrix

PARAMS: dict[str, Any] = {
    "events": 2_600_000,
    "users": 100_000,
    "items": 30_000,
    "min_nnz": 2_000_000,
    "factors": 64,
    "iterations": {"few": 2, "many": 5},
    "spark_master": "local[2]",
    "spark_driver_memory": "6g",
}


def seconds_per_iteration(matrix: sp.csr_matrix, params: AlsConfig, few: int, many: int, spark: Any) -> float:
    elapsed = {}
    for iterations in (few, many):
        started = time.perf_counter()
        train(matrix, params.model_copy(update={"iterations": iterations}), spark)
        elapsed[iterations] = time.perf_counter() - started
    return (elapsed[many] - elapsed[few]) / (many - few)


def run(params: dict[str, Any]) -> dict[str, Any]:
    spec = SyntheticSpec(events=params["events"], users=params["users"], items=params["items"])
    matrix = interaction_matrix(spec)
    if matrix.nnz < params["min_nnz"]:
        raise ValueError(f"synthetic matrix has {matrix.nnz} interactions, fewer than {params['min_nnz']}")
    als = AlsConfig(factors=params["factors"], regularization=1.0, alpha=2.0, use_cg=True)
    few, many = params["iterations"]["few"], params["iterations"]["many"]
    implicit_s = seconds_per_iteration(matrix, als, few, many, None)
    print(f"  implicit: {implicit_s:.3f} s/iteration on {matrix.nnz} interactions", flush=True)
    config = load_config(
        overrides={
            "spark.conf": {
                "spark.driver.memory": params["spark_driver_memory"],
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
            }
        }
    )
    spark = spark_session(config, "bench-als", params["spark_master"])
    try:
        spark_s = seconds_per_iteration(matrix, als.model_copy(update={"backend": "spark"}), few, many, spark)
    finally:
        spark.stop()
    print(f"  spark MLlib: {spark_s:.3f} s/iteration", flush=True)
    return {
        "nnz": int(matrix.nnz),
        "factors": params["factors"],
        "implicit_s_per_iter": implicit_s,
        "spark_s_per_iter": spark_s,
        "implicit_speedup": spark_s / implicit_s,
    }
