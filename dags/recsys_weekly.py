"""
### recsys_weekly

Weekly full retrain. Each task calls one function of `recsys_pipeline.stages`; the data
interval `[data_interval_start, data_interval_end)` fixes every path the run reads and
writes. The run sees the source's events up to `data_interval_end`.

ingest events (Spark) and item metadata → build interactions (Spark) → train ALS (implicit or
Spark MLlib, after an optional sweep) → content vectors for items without a learned one (cold
start) → evaluate → build index →
precompute recommendations for active users → validate → publish to MLflow →
promote `champion` only if every gate passed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DeltaDataIntervalTimetable, dag

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import (
    default_args,
    publish_tail,
    run_macros,
    run_params,
    spark_job,
    stage_task,
)

CONFIG = load_config()
MODE = "full"


@dag(
    dag_id="recsys_weekly",
    # A delta timetable makes a manual run for date D cover the week ending at D.
    schedule=DeltaDataIntervalTimetable(timedelta(weeks=1)),
    start_date=datetime(1997, 9, 22),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "weekly"],
    doc_md=__doc__,
    default_args=default_args(),
    params=run_params(CONFIG),
    user_defined_macros=run_macros(),
)
def recsys_weekly() -> None:
    tail_start, _ = publish_tail(CONFIG, MODE)
    interactions = spark_job(CONFIG, "build_interactions", "build_interactions.py", MODE)
    [
        spark_job(CONFIG, "ingest_events", "ingest_events.py", MODE),
        stage_task("content:run_item_ingest", MODE, "ingest_items")(),
    ] >> interactions
    (
        interactions
        >> spark_job(CONFIG, "train", "train_als.py", MODE)
        >> stage_task("content:run_content", MODE, "content")()
        >> stage_task("evaluate:run_evaluation", MODE, "evaluate")()
        >> stage_task("index:run_index", MODE, "build_index")()
        >> tail_start
    )


recsys_weekly()
