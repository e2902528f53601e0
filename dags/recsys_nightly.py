"""
### recsys_nightly

Daily refresh between weekly retrains. The data interval is one day: the run ingests that
day's events, extends the interactions over the whole history (new IDs appended to the
stable maps), folds the changed and new users and the new items into the current champion
(`recsys_pipeline.refresh`), updates the champion's ScaNN index in place, validates, and
publishes a version that records its weekly parent; `champion` moves only if every gate passed.

When the fold-in drifts too far from its weekly parent, too much of the catalogue is new, or
the parent is too old, the run says why and triggers `recsys_weekly` for the same end date
(with the same `config_overrides`) instead of publishing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DeltaDataIntervalTimetable, dag, task

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import DEFAULT_ARGS, run_params, spark_job

CONFIG = load_config()


@dag(
    dag_id="recsys_nightly",
    schedule=DeltaDataIntervalTimetable(timedelta(days=1)),
    start_date=datetime(1997, 9, 22),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "nightly"],
    doc_md=__doc__,
    default_args=DEFAULT_ARGS,
    params=run_params(),
)
def recsys_nightly() -> None:
    @task
    def fold_in(**context) -> None:
        from recsys_pipeline.refresh import run_refresh
        from recsys_pipeline.runs import RunContext

        run_refresh(RunContext.from_airflow(context, mode="refresh"))

    @task.branch
    def escalate_or_continue(**context) -> str:
        from recsys_pipeline.refresh import next_step
        from recsys_pipeline.runs import RunContext

        return next_step(RunContext.from_airflow(context, mode="refresh"))

    @task
    def update_index(**context) -> None:
        from recsys_pipeline.refresh import run_index_refresh
        from recsys_pipeline.runs import RunContext

        run_index_refresh(RunContext.from_airflow(context, mode="refresh"))

    @task
    def batch_recommend(**context) -> None:
        from recsys_pipeline.recommendations import run_batch_recommendations
        from recsys_pipeline.runs import RunContext

        run_batch_recommendations(RunContext.from_airflow(context, mode="refresh"))

    @task
    def validate(**context) -> None:
        from recsys_pipeline.runs import RunContext
        from recsys_pipeline.validation import run_validation

        run_validation(RunContext.from_airflow(context, mode="refresh"))

    @task
    def publish(**context) -> str:
        from recsys_pipeline.publish import run_publish
        from recsys_pipeline.runs import RunContext

        return run_publish(RunContext.from_airflow(context, mode="refresh"))

    @task
    def promote(version: str, **context) -> str:
        from recsys_pipeline.publish import run_promotion
        from recsys_pipeline.runs import RunContext

        return run_promotion(RunContext.from_airflow(context, mode="refresh"), version)

    full_retrain = TriggerDagRunOperator(
        task_id="trigger_full_retrain",
        trigger_dag_id="recsys_weekly",
        # The weekly run covers the week ending where this day ends, with this run's overrides
        # (the operator parses a rendered JSON string back into the conf dict).
        logical_date="{{ data_interval_end.isoformat() }}",
        conf='{"config_overrides": {{ params.config_overrides | tojson }}}',
        skip_when_already_exists=True,
    )
    ingest = spark_job(CONFIG, "ingest_events", "ingest_events.py", mode="refresh")
    interactions = spark_job(CONFIG, "build_interactions", "build_interactions.py", mode="refresh")
    branch = escalate_or_continue()
    published = publish()
    ingest >> interactions >> fold_in() >> branch
    branch >> full_retrain
    branch >> update_index() >> batch_recommend() >> validate() >> published
    promote(published)


recsys_nightly()
