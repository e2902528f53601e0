"""
### recsys_weekly

Weekly full retrain. The stages are declared once in `recsys_pipeline.pipelines.WEEKLY`: each
task calls one stage function, after the stages whose outputs it reads; the data interval
`[data_interval_start, data_interval_end)` fixes every path the run reads and writes. The run
sees the source's events up to `data_interval_end`.

ingest events, then item metadata, then build interactions (one Spark application) → train
ALS (implicit in the task, or Spark MLlib, after an optional sweep) → content vectors for items
without a learned one (cold start) → evaluate, build the index, precompute recommendations for active users →
validate → publish to MLflow → promote `champion` only if every gate passed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DeltaDataIntervalTimetable, dag

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import default_args, run_macros, run_params, wire
from recsys_pipeline.pipelines import WEEKLY

CONFIG = load_config()


@dag(
    dag_id=WEEKLY.dag_id,
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
    wire(WEEKLY, CONFIG)


recsys_weekly()
