"""
### recsys_weekly

Weekly full retrain. Each task calls one function of `recsys_pipeline`; the data
interval `[data_interval_start, data_interval_end)` fixes every path the run reads and
writes. The run sees the source's events up to `data_interval_end`.

ingest events → build interactions (Spark) → train ALS (implicit or Spark MLlib, after an
optional sweep) → evaluate → build index →
precompute recommendations for active users → validate → publish to MLflow →
promote `champion` only if every gate passed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DeltaDataIntervalTimetable, dag, task

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import DEFAULT_ARGS, run_params, spark_job

CONFIG = load_config()


@dag(
    dag_id="recsys_weekly",
    # A delta timetable makes a manual run for date D cover the week ending at D.
    schedule=DeltaDataIntervalTimetable(timedelta(weeks=1)),
    start_date=datetime(1997, 9, 22),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "weekly"],
    doc_md=__doc__,
    default_args=DEFAULT_ARGS,
    params=run_params(),
)
def recsys_weekly() -> None:
    @task
    def evaluate(**context) -> None:
        from recsys_pipeline.evaluate import run_evaluation
        from recsys_pipeline.runs import RunContext

        run_evaluation(RunContext.from_airflow(context))

    @task
    def build_index(**context) -> None:
        from recsys_pipeline.index import run_index
        from recsys_pipeline.runs import RunContext

        run_index(RunContext.from_airflow(context))

    @task
    def batch_recommend(**context) -> None:
        from recsys_pipeline.recommendations import run_batch_recommendations
        from recsys_pipeline.runs import RunContext

        run_batch_recommendations(RunContext.from_airflow(context))

    @task
    def validate(**context) -> None:
        from recsys_pipeline.runs import RunContext
        from recsys_pipeline.validation import run_validation

        run_validation(RunContext.from_airflow(context))

    @task
    def publish(**context) -> str:
        from recsys_pipeline.publish import run_publish
        from recsys_pipeline.runs import RunContext

        return run_publish(RunContext.from_airflow(context))

    @task
    def promote(version: str, **context) -> str:
        from recsys_pipeline.publish import run_promotion
        from recsys_pipeline.runs import RunContext

        return run_promotion(RunContext.from_airflow(context), version)

    ingest = spark_job(CONFIG, "ingest_events", "ingest_events.py")
    interactions = spark_job(CONFIG, "build_interactions", "build_interactions.py")
    train = spark_job(CONFIG, "train", "train_als.py")
    published = publish()
    (
        ingest
        >> interactions
        >> train
        >> evaluate()
        >> build_index()
        >> batch_recommend()
        >> validate()
        >> published
    )
    promote(published)


recsys_weekly()
