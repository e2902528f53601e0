"""However ``source.path`` is written, the ledger finds every file Spark read (issue #31, item 11).

Spark names the files it read absolutely, with ``.`` and ``..`` resolved; the ledger used to key
them as written, so a path through ``..`` (or relative to the working folder) failed with a
``KeyError`` after the lake had been rewritten, and the next run read everything again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from tests.conftest import csv_events_source

ROWS = ["u1,i1,view,1,880000000", "u1,i2,click,1,880000100", "u2,i1,view,1,880000200"]


@pytest.mark.parametrize("written", ["through_parent", "relative_to_cwd"])
def test_a_source_path_through_dot_dot_or_the_working_folder_is_ingested_once(
    tmp_path: Path, spark, make_config, monkeypatch, written: str
) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "events" / "day1.csv").write_text("user,item,type,value,ts\n" + "\n".join(ROWS) + "\n")
    if written == "through_parent":
        path = f"{tmp_path}/elsewhere/../events"
    else:
        monkeypatch.chdir(tmp_path)
        path = "events"
    config = make_config(**csv_events_source("paths", tmp_path / "events"))
    config.source.path = Path(path)  # as a config built in code (or a snapshot) may hold it
    first = run_ingest(spark, RunContext.create(config, "recsys_weekly", "1997-11-15", "1997-11-22", "r1"))
    assert first["source_files_read"] == 1 and first["events_ingested"] == len(ROWS)
    again = run_ingest(spark, RunContext.create(config, "recsys_weekly", "1997-11-15", "1997-11-22", "r2"))
    assert again["source_files_read"] == 0 and again["source_files_skipped"] == 1
    assert os.path.normpath(tmp_path / "events" / "day1.csv") in (
        (config.state_home / "lake" / "events" / "_source_ledger.json").read_text()
    )
