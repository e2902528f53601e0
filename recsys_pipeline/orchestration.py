"""Airflow wiring shared by the DAG files: Spark stages are submitted through the provider's operator."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from recsys_pipeline.config import PROJECT_ROOT, PipelineConfig
from recsys_pipeline.runs import RunMode

if TYPE_CHECKING:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator


def run_params() -> dict[str, Any]:
    """The params every recsys DAG takes: single config fields overridden for one run."""
    from airflow.sdk import Param

    return {"config_overrides": Param({}, type="object", description='{"section.key": value} over conf/')}


DEFAULT_ARGS = {"owner": "recsys", "retries": 0}

RUN_ARGS = [
    "--dag-id",
    "{{ dag.dag_id }}",
    "--run-id",
    "{{ run_id }}",
    "--interval-start",
    "{{ data_interval_start.isoformat() }}",
    "--interval-end",
    "{{ data_interval_end.isoformat() }}",
    "--overrides-json",
    "{{ params.config_overrides | tojson }}",
]


def spark_job(
    config: PipelineConfig, task_id: str, script: str, mode: RunMode = "full"
) -> SparkSubmitOperator:
    """A ``jobs/<script>`` stage submitted to the configured Spark connection for the run's interval."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    return SparkSubmitOperator(
        task_id=task_id,
        application=str(PROJECT_ROOT / "jobs" / script),
        conn_id=config.spark.conn_id,
        conf={
            **config.spark.conf,
            "spark.pyspark.python": sys.executable,
            "spark.pyspark.driver.python": sys.executable,
        },
        name=f"recsys-{task_id}",
        application_args=[*RUN_ARGS, "--mode", mode],
    )
