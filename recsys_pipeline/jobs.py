"""The shared shape of the ``spark-submit`` entry points in ``jobs/``: parse, start Spark, call, report."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence

from pyspark.sql import SparkSession

from recsys_pipeline.config import load_config
from recsys_pipeline.runs import RunContext
from recsys_pipeline.spark import spark_session

SparkStage = Callable[[SparkSession, RunContext], dict[str, float]]


def run_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--config", default=None, help="Pipeline YAML (default: $RECSYS_CONFIG or conf/pipeline.yaml)"
    )
    parser.add_argument(
        "--overrides-json", default="{}", help='{"section.key": value} applied over the config'
    )
    parser.add_argument("--dag-id", required=True)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--interval-start", required=True, help="ISO-8601 data interval start")
    parser.add_argument("--interval-end", required=True, help="ISO-8601 data interval end (exclusive)")
    parser.add_argument(
        "--mode",
        choices=["full", "refresh"],
        default="full",
        help="full retrain (weekly) or refresh (nightly)",
    )
    return parser


def run_context(args: argparse.Namespace) -> RunContext:
    config = load_config(args.config, json.loads(args.overrides_json or "{}"))
    return RunContext.create(
        config, args.dag_id, args.interval_start, args.interval_end, args.run_id, args.mode
    )


def run_spark_job(stage: SparkStage, app_name: str, argv: Sequence[str], master: str | None = None) -> int:
    """Run one Spark stage; a known failure prints one clear line and exits 1 instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run = run_context(run_arguments().parse_args(argv))
    spark = spark_session(run.config, f"{app_name}:{run.interval_key}", master)
    try:
        metrics = stage(spark, run)
    except (ValueError, RuntimeError) as error:
        logging.error("%s failed: %s", app_name, error)
        return 1
    finally:
        spark.stop()
    logging.info("%s done: %s", app_name, json.dumps(metrics, sort_keys=True))
    return 0
