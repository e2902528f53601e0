"""Airflow wiring shared by the DAG files: tasks that call one stage function each, Spark stages
submitted through the provider's operator, and the tail every DAG ends with.

A :class:`~recsys_pipeline.errors.RecsysError` (bad input, a failed gate) fails its task at once:
running it again would fail the same way. Anything else (a lost executor, a killed process) is
retried with exponential backoff; every stage is safe to re-run.
"""

from __future__ import annotations

import atexit
import base64
import gc
import json
import logging
import re
import sys
import urllib.request
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from recsys_pipeline.config import ALERTS_CONN_ID, PROJECT_ROOT, PipelineConfig, load_config

# DAG files are parsed often: nothing imported here at the top may pull in Spark (``jobs`` does) or
# NumPy, SciPy and Arrow (``runs`` does); what a task needs loads when it runs.
from recsys_pipeline.errors import USER_ERROR_EXIT, RecsysError, StageSkipped
from recsys_pipeline.pipelines import STAGES_PACKAGE, Pipeline, Stage
from recsys_pipeline.redaction import redact_text, without_user_info
from recsys_pipeline.resources import measured
from recsys_pipeline.trigger import TRIGGER_PARAMS, run_overrides, trigger_defaults

if TYPE_CHECKING:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from recsys_pipeline.runs import RunContext, RunMode

ESCALATION_TASK = "trigger_full_retrain"
log = logging.getLogger(__name__)

# `airflow dags test` (make run, the benchmarks, recsys replay) runs every task of a DAG in one
# process, and at its exit Python's collector walked every object the stages had loaded: 3-3.5 s of
# each run, sample or 20M events alike. Frozen objects are left to the process's end; exit handlers
# (MLflow's, logging's, temporary folders') still run. Airflow's own task processes end by os._exit.
atexit.register(gc.freeze)


def default_args() -> dict[str, Any]:
    """Every task's retries, timeout and failure alert."""
    return {
        "owner": "recsys",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=4),
        "on_failure_callback": [failure_notifier()],
    }


def failure_notifier() -> Any:
    """An Airflow notifier for failed tasks: it always logs one line naming the DAG, run, task and
    error; when the connection ``recsys_alerts`` exists (an HTTP URL, such as a Slack or Teams
    incoming webhook), it also posts ``{"text": ...}`` there. Built per DAG file parse, so that the
    Airflow SDK is imported only where DAGs are."""
    from airflow.sdk import BaseHook, BaseNotifier

    class RecsysFailureNotifier(BaseNotifier):
        def notify(self, context: Any) -> None:
            text = failure_text(context)
            log.error(text)
            try:
                connection = BaseHook.get_connection(ALERTS_CONN_ID)
            except Exception:  # no such connection: logging is the whole alert
                return
            # A URI connection (http://host:port/path) or a JSON one whose host is the whole URL; its
            # login and password go in a header, so that no URL built from them reaches a message.
            host = connection.host or ""
            url = host if "://" in host else connection.get_uri()
            post_alert(url, text, (connection.login or "", connection.password or ""))

    return RecsysFailureNotifier()


def failure_text(context: Any) -> str:
    task = context["task_instance"]
    error = context.get("exception")
    return f"recsys: task {task.task_id} of {task.dag_id} run {context['run_id']} failed" + (
        f": {redact_text(str(error))[:500]}" if error else ""
    )


def post_alert(url: str, text: str, login: tuple[str, str] = ("", "")) -> None:
    """POST ``{"text": text}`` as JSON, with HTTP basic auth when ``login`` (user, password) is set;
    a failing alert is logged without the URL's credentials, never raised over the task's failure."""
    headers = {"Content-Type": "application/json"}
    url = without_user_info(url)
    if any(login):
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    try:
        request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=10):
            pass
    except (OSError, ValueError) as error:  # ValueError: a URL urllib cannot parse (http.client.InvalidURL)
        log.warning(
            "could not post the failure alert to the %s connection: %s",
            ALERTS_CONN_ID,
            redact_text(str(error)),
        )


def champion_asset(config: PipelineConfig) -> Any:
    """What a successful promote updates: consumer DAGs scheduled on it run on each new champion."""
    from airflow.sdk import Asset

    model = config.mlflow.model_name
    return Asset(name=f"{model}_champion", uri=f"recsys://{model}/champion")


# The run's data window as templates (see :func:`run_window`).
_WINDOW = "recsys_window(dag_run.run_type, logical_date, data_interval_start, data_interval_end)"
WINDOW_START = "{{ " + _WINDOW + "[0].isoformat() }}"
WINDOW_END = "{{ " + _WINDOW + "[1].isoformat() }}"

RUN_ARGS = [
    "--dag-id",
    "{{ dag.dag_id }}",
    "--run-id",
    "{{ run_id }}",
    "--interval-start",
    WINDOW_START,
    "--interval-end",
    WINDOW_END,
    "--overrides-json",
    "{{ recsys_overrides(params) }}",
]


def run_params(config: PipelineConfig) -> dict[str, Any]:
    """The params every recsys DAG takes: the typed knobs of the trigger form (defaults: the
    config's own values), and ``config_overrides`` for any other single field."""
    from airflow.sdk import Param

    defaults = trigger_defaults(config)
    typed = {
        name: Param(defaults[name], description=f"{help_text} ({field})", **schema)
        for name, (field, schema, help_text) in TRIGGER_PARAMS.items()
    }
    return {
        **typed,
        "config_overrides": Param(
            {},
            type="object",
            description='{"section.key": value} over conf/ and the fields above, for '
            + ", ".join(config.run_overrides_allowed),
            # Refused before the run (and its conf) exists; a failing key is named, never a value.
            propertyNames={
                "pattern": "^("
                + "|".join(re.escape(field) for field in config.run_overrides_allowed)
                + ")(\\.|$)"
            },
        ),
    }


def run_macros() -> dict[str, Any]:
    """Template helpers of every recsys DAG: ``recsys_overrides(params)`` is the JSON of the overrides
    a run's params ask for, as the Spark jobs take them; ``recsys_params(params)`` the params
    themselves, as another recsys DAG's run conf takes them; ``recsys_window(...)`` is the run's
    data window (:func:`run_window`)."""

    def recsys_overrides(params: Any) -> str:
        return json.dumps(run_overrides(dict(params), load_config()))

    def recsys_params(params: Any) -> str:
        return json.dumps(dict(params))

    return {
        "recsys_overrides": recsys_overrides,
        "recsys_params": recsys_params,
        "recsys_window": run_window,
    }


def run_window(
    run_type: str, logical_date: datetime | None, interval_start: datetime, interval_end: datetime
) -> tuple[datetime, datetime]:
    """A DAG run's data window: the interval Airflow gave it, except that a manual run covers the
    period (the interval's length) ending at its logical date.

    The REST API, the UI's trigger form and a triggering operator infer a manual interval from the
    logical date already; Airflow's CLI trigger infers it from the wall clock instead, which would
    train a run for 1998 on whatever the last week of real time holds.
    """
    if str(run_type).lower().endswith("manual") and logical_date is not None and logical_date != interval_end:
        return logical_date - (interval_end - interval_start), logical_date
    return interval_start, interval_end


def airflow_run(context: dict[str, Any], mode: RunMode) -> RunContext:
    """The run an Airflow task context describes; its params (the typed trigger params, then
    ``config_overrides``) override the config."""
    from recsys_pipeline.runs import RunContext

    return RunContext.open(
        context["dag"].dag_id,
        context["run_id"],
        *run_window(
            getattr(context.get("dag_run"), "run_type", ""),
            context.get("logical_date"),
            context["data_interval_start"],
            context["data_interval_end"],
        ),
        mode,
        overrides=run_overrides(dict(context["params"]), load_config()),
    )


def call_stage(stage: Stage, mode: RunMode, context: dict[str, Any], *upstream: Any) -> Any:
    """Call the stage's function for the task's run; a user-facing failure fails the task without
    retries."""
    from airflow.sdk.exceptions import AirflowFailException

    function = stage.callable()
    try:
        run = airflow_run(context, mode)
        if not stage.runs_on_published:
            run.publication.refuse_if_published(stage.name)
    except RecsysError as error:
        raise AirflowFailException(str(error)) from error
    cost: dict[str, float] = {}
    try:
        with measured(stage.name, cost):
            return function(run, *upstream)
    except StageSkipped as skipped:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(str(skipped)) from skipped
    except RecsysError as error:
        run.publication.record_failure(stage.name, error)
        raise AirflowFailException(str(error)) from error
    finally:
        run.artifacts.write_metrics(f"stage_{stage.name}", cost)


def stage_task(stage: Stage, mode: RunMode, outlets: list[Any]) -> Any:
    """A TaskFlow task running one stage; only a stage that ``returns`` an artifact (the published
    version) pushes its result to XCom."""
    from airflow.sdk import task

    @task(task_id=stage.name, outlets=outlets)
    def run_stage(*upstream: Any, **context: Any) -> Any:
        result = call_stage(stage, mode, context, *upstream)
        return result if stage.returns else None

    return run_stage


def branch_task(stage: Stage, mode: RunMode, if_true: str, if_false: list[str]) -> Any:
    """A branch that follows ``if_true`` when the stage function returns True, else ``if_false``."""
    from airflow.sdk import task

    @task.branch(task_id=stage.name)
    def decide(**context: Any) -> str | list[str]:
        return if_true if call_stage(stage, mode, context) else if_false

    return decide()


def task_id(pipeline: Pipeline, stage: Stage, config: PipelineConfig) -> str:
    """A stage of a Spark job runs in the job's task; any other in its own task."""
    return pipeline.job_of(stage, config) or stage.name


def wire(pipeline: Pipeline, config: PipelineConfig) -> dict[str, Any]:
    """Create the tasks of ``pipeline`` in the DAG being defined, each after the stages whose
    artifacts it reads: Spark jobs through the configured Spark connection, every other stage as
    a Python task, a branch's escalation as a trigger of the DAG it names. Returns the tasks by id."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    tasks: dict[str, Any] = {}
    for stage in pipeline.stages:
        own = task_id(pipeline, stage, config)
        if own in tasks:
            continue  # a further stage of a Spark job already submitted
        job = pipeline.job_of(stage, config)
        if job is not None:
            tasks[own] = spark_job(config, pipeline, job)
        elif stage.escalates_to:
            tasks[ESCALATION_TASK] = TriggerDagRunOperator(
                task_id=ESCALATION_TASK,
                trigger_dag_id=stage.escalates_to,
                # The run covers the window ending where this one ends, with this run's params (the
                # operator parses a rendered JSON string back into the conf dict).
                logical_date=WINDOW_END,
                conf="{{ recsys_params(params) }}",  # type: ignore[arg-type]  # a template, rendered to a dict
                skip_when_already_exists=True,
            )
            after = [
                task_id(pipeline, later, config)
                for later in pipeline.stages
                if stage.name in pipeline.upstream(later.name)
            ]
            tasks[own] = branch_task(stage, pipeline.mode, ESCALATION_TASK, after)
            tasks[own] >> tasks[ESCALATION_TASK]
        else:
            handed = [
                tasks[task_id(pipeline, writer, config)]
                for writer in pipeline.stages
                if writer.returns is not None and writer.returns in stage.reads
            ]
            outlets = [champion_asset(config)] if stage.updates_champion else []
            tasks[own] = stage_task(stage, pipeline.mode, outlets)(*handed)
    for stage in pipeline.stages:
        for upstream in pipeline.upstream(stage.name):
            before, after = (
                tasks[task_id(pipeline, pipeline.stage(upstream), config)],
                tasks[task_id(pipeline, stage, config)],
            )
            if before is not after:
                before >> after
    return tasks


# The recsys_forget DAG's stages in order: (task id, stage function under recsys_pipeline.stages.forget).
FORGET_STAGES = (
    ("erase_state", "run_state_erasure"),
    ("republish", "run_republish"),
    ("verify_erasure", "run_erasure_verification"),
)


def wire_forget(config: PipelineConfig) -> dict[str, Any]:
    """The tasks of ``recsys_forget``, one per stage in order; each reads the request's id (the run's
    only param) and nothing else. Republishing moves the champion, so it updates the champion asset."""
    tasks = {
        name: forget_task(name, function, [champion_asset(config)] if name == "republish" else [])()
        for name, function in FORGET_STAGES
    }
    names = [name for name, _ in FORGET_STAGES]
    for before, after in zip(names, names[1:], strict=False):
        tasks[before] >> tasks[after]
    return tasks


def forget_task(name: str, function: str, outlets: list[Any]) -> Any:
    """A TaskFlow task calling one stage of :mod:`recsys_pipeline.stages.forget` for the run's
    request; a user-facing failure (an unknown request, an id still found) fails without retries."""
    from airflow.sdk import task

    @task(task_id=name, outlets=outlets)
    def run_stage(**context: Any) -> None:
        from importlib import import_module

        from airflow.sdk.exceptions import AirflowFailException

        stage = getattr(import_module(f"{STAGES_PACKAGE}.forget"), function)
        request_id = str(context["params"]["request_id"])
        extra = (context["run_id"],) if function == "run_republish" else ()
        try:
            stage(load_config(), request_id, *extra)
        except RecsysError as error:
            raise AirflowFailException(str(error)) from error

    return run_stage


def spark_job(config: PipelineConfig, pipeline: Pipeline, job: str) -> SparkSubmitOperator:
    """One Spark job of the pipeline (its stages in one application, ``jobs/run_stages.py``),
    submitted to the configured Spark connection for the run's interval."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from recsys_pipeline.spark import DRIVER_OPTIONS, class_archive, driver_java_options

    refresh = pipeline.mode == "refresh"
    configured_options = config.spark.job_conf(refresh).get(DRIVER_OPTIONS, "")

    class StageSparkSubmitOperator(SparkSubmitOperator):
        """A job that exits with ``USER_ERROR_EXIT`` failed on its input: fail without retries."""

        def execute(self, context: Any) -> None:
            # Set on the machine that runs the job: the archive of the driver's classes is its own.
            options = driver_java_options(configured_options, class_archive())
            self.conf = {**(self.conf or {}), DRIVER_OPTIONS: options}
            try:
                super().execute(context)
            except AirflowException as error:
                if f"Error code is: {USER_ERROR_EXIT}." in str(error):
                    raise AirflowFailException(f"{job} failed on its input; see the log above") from error
                raise

    return StageSparkSubmitOperator(
        task_id=job,
        application=str(PROJECT_ROOT / "jobs" / "run_stages.py"),
        conn_id=config.spark.conn_id,
        # Rendered and stored by Airflow: secret settings reach Spark through the job's own session.
        conf={
            **config.spark.submit_conf(refresh),
            "spark.pyspark.python": sys.executable,
            "spark.pyspark.driver.python": sys.executable,
        },
        name=f"recsys-{job}",
        application_args=[*RUN_ARGS, "--mode", pipeline.mode, "--job", job],
        # Two runs at once (a backfill, a nightly beside a weekly) queue for the Spark slots.
        pool=config.spark.pool,
    )
