"""Spark sessions configured from the pipeline config."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from recsys_pipeline.config import PROJECT_ROOT, PipelineConfig


def spark_session(config: PipelineConfig, app_name: str, master: str | None = None) -> SparkSession:
    """Get or create a session.

    Under ``spark-submit`` the master comes from the submit command (``master=None``);
    in-process callers such as tests and benchmarks pass ``config.spark.master``.
    """
    # Executors must run the same interpreter (and so the same packages) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_CONF_DIR", str(PROJECT_ROOT / "conf" / "spark"))
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    # Event logs let Spark's history server replay any stage's run; a deployment's own setting wins.
    if "spark.eventLog.enabled" not in config.spark.conf:
        events = config.state_home / "spark-events"
        events.mkdir(parents=True, exist_ok=True)
        builder = builder.config("spark.eventLog.enabled", "true").config(
            "spark.eventLog.dir", events.as_uri()
        )
    for key, value in config.spark.conf.items():
        builder = builder.config(key, value)
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        # Standard UTC-adjusted Parquet timestamps (not legacy INT96), so Arrow readers agree with Spark.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def label_actions(spark: SparkSession, label: str) -> None:
    """Name the Spark actions from here on, until the next label: Spark's UI, its event logs and the
    pipeline benchmark's per-action profile show this instead of a JVM call site."""
    spark.sparkContext.setJobDescription(label)
