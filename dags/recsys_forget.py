"""
### recsys_forget

Honour an erasure request recorded by `recsys forget` (docs/erasure.md). The run's only param is
the request's id: the user ids exist nowhere but as salted hashes in the state's erasure ledger,
so none reaches this run's conf, its XComs or its logs.

erase the users from the state (the lake's files holding their events, quarantine tables, the ID
map's entries as tombstones, every run folder) → republish the champion (and the previous champion,
and a nightly's weekly parent) without them and move the aliases; delete the artifacts of every
other version → verify: scan the state folder and the artifact store for any of the ids, write the
report (HTML and JSON, logged to MLflow), and fail if one is found.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag

from recsys_pipeline.config import load_config
from recsys_pipeline.orchestration import default_args, wire_forget

CONFIG = load_config()


@dag(
    dag_id="recsys_forget",
    schedule=None,
    start_date=datetime(1997, 9, 22),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "erasure"],
    doc_md=__doc__,
    default_args=default_args(),
    params={
        "request_id": Param(
            "", type="string", minLength=1, description="the erasure request `recsys forget` recorded"
        )
    },
)
def recsys_forget() -> None:
    wire_forget(CONFIG)


recsys_forget()
