"""
### recsys_nightly

Daily refresh between weekly retrains, declared in `recsys_pipeline.pipelines.NIGHTLY`. The data
interval is one day: the run ingests that
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

from airflow.sdk import DeltaDataIntervalTimetable, dag

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import default_args, run_macros, run_params, wire
from recsys_pipeline.pipelines import NIGHTLY

CONFIG = load_config()


@dag(
    dag_id=NIGHTLY.dag_id,
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
    wire(NIGHTLY, CONFIG)


recsys_nightly()
