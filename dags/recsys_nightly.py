"""
### recsys_nightly

Daily refresh between weekly retrains. The data interval is one day: the run ingests that
day's events and extends the interactions over the whole history (new IDs appended to the
stable maps), both in one Spark application whose stages record their costs as `ingest_events`
and `build_interactions`; it then folds the changed and new users and the new items into the
champion of the day's time (the live champion; in a dry run or a replay of history, the version
the earlier runs would have promoted) (`recsys_pipeline.stages.refresh`), updates that version's
ScaNN index in place, validates, and publishes a version that records its weekly parent;
`champion` moves only if every gate passed.

When the fold-in drifts too far from its weekly parent, too much of the catalogue is new, or
the parent is too old, the run says why and triggers `recsys_weekly` for the same end date
(with the same params) instead of publishing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DeltaDataIntervalTimetable, dag

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import (
    WINDOW_END,
    branch_task,
    default_args,
    publish_tail,
    run_macros,
    run_params,
    spark_job,
    stage_task,
)

CONFIG = load_config()
MODE = "refresh"


@dag(
    dag_id="recsys_nightly",
    schedule=DeltaDataIntervalTimetable(timedelta(days=1)),
    start_date=datetime(1997, 9, 22),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "nightly"],
    doc_md=__doc__,
    default_args=default_args(),
    params=run_params(CONFIG),
    user_defined_macros=run_macros(),
)
def recsys_nightly() -> None:
    full_retrain = TriggerDagRunOperator(
        task_id="trigger_full_retrain",
        trigger_dag_id="recsys_weekly",
        # The weekly run covers the week ending where this day ends, with this run's params (the
        # operator parses a rendered JSON string back into the conf dict).
        logical_date=WINDOW_END,
        conf="{{ recsys_params(params) }}",
        skip_when_already_exists=True,
    )
    update_index = stage_task("index:run_index_refresh", MODE, "update_index")()
    branch = branch_task(
        "refresh:refresh_escalated",
        MODE,
        "escalate_or_continue",
        if_true=full_retrain.task_id,
        if_false=update_index.operator.task_id,
    )
    tail_start, _ = publish_tail(CONFIG, MODE)
    (
        spark_job(CONFIG, "ingest_and_build_interactions", "ingest_and_build_interactions.py", MODE)
        >> stage_task("refresh:run_refresh", MODE, "fold_in")()
        >> branch
    )
    branch >> full_retrain
    branch >> update_index >> tail_start


recsys_nightly()
