"""What ``jobs/run_stages.py`` runs under ``spark-submit``: the stages of one Spark job of a declared
pipeline (:mod:`recsys_pipeline.pipelines`), in one application: parse, start Spark, call, report."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from functools import partial

from recsys_pipeline.errors import USER_ERROR_EXIT, RecsysError
from recsys_pipeline.pipelines import PIPELINES
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.resources import measured
from recsys_pipeline.runs import RunContext
from recsys_pipeline.spark import SessionOnDemand, spark_session


def run_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--config",
        default=None,
        help="Profile YAML layered over conf/pipeline.yaml (default: $RECSYS_CONFIG or conf/sample.yaml)",
    )
    parser.add_argument(
        "--overrides-json", default="{}", help='{"section.key": value} applied over the config'
    )
    parser.add_argument("--dag-id", required=True, choices=sorted(PIPELINES))
    parser.add_argument("--job", required=True, help="the Spark job of the DAG's pipeline to run")
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
    """The run the arguments name, with the config snapshot of its first task."""
    return RunContext.open(
        args.dag_id,
        args.run_id or f"manual__{args.interval_end}",
        args.interval_start,
        args.interval_end,
        args.mode,
        config_path=args.config,
        overrides=json.loads(args.overrides_json or "{}"),
    )


def run_spark_job(argv: Sequence[str], master: str | None = None) -> int:
    """Run the stages of one Spark job in order in one application, each recording its cost and any
    failure under its name (``stage_seconds_<name>``, ``stage_peak_rss_mb_<name>``); a user-facing
    failure (:class:`RecsysError`) stops the rest, prints one clear line and exits with
    ``USER_ERROR_EXIT``.

    Stages that run together share the Spark start-up and a warm JVM: on a small input (a night's
    events) those cost more than the work. The session starts when a stage first uses it
    (:class:`SessionOnDemand`): stages that do a night's work on the driver start none, and the
    log's ``spark_session_started`` says whether one did. Any failure but a user-facing one is a bug
    and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = run_arguments().parse_args(argv)
    app_name = f"recsys-{args.job}"
    metrics: dict[str, float] = {}
    try:
        run = run_context(args)
        stages = PIPELINES[args.dag_id].spark_jobs(run.config).get(args.job, [])
        if not stages:
            raise RecsysError(f"{args.dag_id} has no Spark job {args.job!r}")
        for stage in stages:
            run.publication.refuse_if_published(stage.name)
        spark = SessionOnDemand(
            partial(
                spark_session,
                run.config,
                f"{app_name}:{run.interval_key}",
                master,
                refresh=run.mode == "refresh",
            )
        )
        try:
            for stage in stages:
                cost: dict[str, float] = {}
                try:
                    with measured(stage.name, cost):
                        if stage.uses_spark(run.config):
                            metrics |= stage.callable()(spark=spark, run=run)
                        else:
                            metrics |= stage.callable()(run)
                except RecsysError as error:
                    run.publication.record_failure(stage.name, error)
                    raise
                finally:
                    run.artifacts.write_metrics(f"stage_{stage.name}", cost)
        finally:
            spark.stop()
        metrics["spark_session_started"] = float(spark.started)
    except RecsysError as error:
        logging.error("%s failed: %s", app_name, redact_text(str(error)))
        return USER_ERROR_EXIT
    logging.info("%s done: %s", app_name, json.dumps(metrics, sort_keys=True))
    return 0
