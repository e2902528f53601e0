"""The shared ID maps, and every run output, survive a crash at any step of their swap (issue #31, 7).

A child process swaps in a new snapshot (or a run's output folder) and is killed (``os._exit``)
just before its n-th file operation, for every n until one run completes: after each kill, what
the next reader sees is the old version or the new one, complete, never nothing; the next swap
cleans up what the killed one left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_pipeline import runs
from recsys_pipeline.artifacts import IdMapMismatchError, InteractionsFiles
from recsys_pipeline.files import (
    SNAPSHOTS,
    atomic_dir,
    publish_snapshot,
    recover_pointer,
    restore_set_aside,
    write_json,
)
from recsys_pipeline.runs import PUBLISHED_RECORD, RunContext

CRASHING = """
import os, shutil, sys
from pathlib import Path

target, crash_at = Path(sys.argv[1]), int(sys.argv[2])
calls = [0]

def crashing(function):
    def wrapper(*args, **kwargs):
        if calls[0] == crash_at:
            os._exit(137)
        calls[0] += 1
        return function(*args, **kwargs)
    return wrapper

for module, name in ((os, "symlink"), (os, "replace"), (os, "rename"), (shutil, "rmtree"),
                     (shutil, "copytree"), (os, "fsync")):
    setattr(module, name, crashing(getattr(module, name)))
"""
CHILD = CRASHING + textwrap.dedent(
    """
    from recsys_pipeline.files import publish_snapshot

    def build(staging):
        staging.mkdir()
        (staging / "ids.txt").write_text("new")

    publish_snapshot(target, build)
    """
)
RUN_OUTPUT_CHILD = CRASHING + textwrap.dedent(
    """
    from recsys_pipeline.files import atomic_dir

    with atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "out.txt").write_text("new")
    """
)


def old_state(root: Path, legacy: bool) -> Path:
    pointer = root / "id_maps" / "users"
    if legacy:  # a folder written before snapshots
        pointer.mkdir(parents=True)
        (pointer / "ids.txt").write_text("old")
    else:
        pointer.parent.mkdir(parents=True)
        publish_snapshot(pointer, writing("old"))
    return pointer


def writing(content: str):
    def build(staging: Path) -> None:
        staging.mkdir()
        (staging / "ids.txt").write_text(content)

    return build


@pytest.mark.e2e
@pytest.mark.parametrize("legacy", [True, False], ids=["from-a-folder", "from-a-snapshot"])
def test_a_kill_between_any_two_file_operations_never_leaves_the_maps_missing(tmp_path, legacy) -> None:
    outcomes = set()
    for crash_at in range(100):
        root = tmp_path / f"{crash_at}"
        pointer = old_state(root, legacy)
        child = subprocess.run([sys.executable, "-c", CHILD, str(pointer), str(crash_at)], cwd=Path.cwd())
        recover_pointer(pointer)  # what the interactions stage does before it reads the maps
        content = (pointer / "ids.txt").read_text()
        assert content in ("old", "new"), f"killed before operation {crash_at}"
        outcomes.add(content)

        # The next swap starts from there and leaves exactly one snapshot, the one named.
        publish_snapshot(pointer, writing("next"))
        assert (pointer / "ids.txt").read_text() == "next"
        assert [p.resolve() for p in (pointer.parent / SNAPSHOTS).iterdir()] == [pointer.resolve()]
        if child.returncode == 0:
            break
    else:
        pytest.fail("the swap never completed")
    assert crash_at >= 4 and outcomes == {"old", "new"}


@pytest.mark.e2e
def test_a_kill_while_a_run_output_is_replaced_leaves_the_old_or_the_new_one(tmp_path) -> None:
    outcomes = set()
    for crash_at in range(20):
        target = tmp_path / f"{crash_at}" / "interactions"
        target.mkdir(parents=True)
        (target / "out.txt").write_text("old")
        child = subprocess.run([sys.executable, "-c", RUN_OUTPUT_CHILD, str(target), str(crash_at)])
        restore_set_aside(target)  # what the retried task's atomic_dir does first
        content = (target / "out.txt").read_text()
        assert content in ("old", "new"), f"killed before operation {crash_at}"
        outcomes.add(content)
        with atomic_dir(target) as staging:
            staging.mkdir()
            (staging / "out.txt").write_text("retried")
        assert (target / "out.txt").read_text() == "retried"
        assert sorted(p.name for p in target.parent.iterdir() if ".old-" in p.name) == []
        if child.returncode == 0:
            break
    else:
        pytest.fail("the swap never completed")
    assert crash_at >= 2 and outcomes == {"old", "new"}


def test_a_crash_while_marking_a_run_published_leaves_it_to_be_marked_again(make_config, monkeypatch) -> None:
    run = RunContext.create(make_config(), "recsys_weekly", "1998-04-16", "1998-04-23", "manual__p")
    writes = []

    def crash_on_the_second(path: Path, payload) -> None:
        if writes:
            raise KeyboardInterrupt  # the process dies here
        writes.append(path)
        write_json(path, payload)

    monkeypatch.setattr(runs, "write_json", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run.publication.mark_published("recsys-als", "3")
    monkeypatch.undo()
    # The run is not frozen yet, so publishing it again finds version 3 and marks it (run_publish).
    assert run.publication.published_version() is None
    run.publication.mark_published("recsys-als", "3")
    assert run.publication.published_version() == "3"
    assert json.loads((run.window_dir / PUBLISHED_RECORD).read_text())["version"] == "3"


def test_vectors_are_never_matched_by_index_to_maps_that_do_not_extend_their_own(make_config) -> None:
    config = make_config()

    def run_with_maps(interval_start: str, interval_end: str, users: list[str]) -> InteractionsFiles:
        run = RunContext.create(config, "recsys_weekly", interval_start, interval_end, "manual__maps")
        interactions = run.artifacts.interactions
        for side, ids in (("users", users), ("items", ["i0", "i1"])):
            interactions.map_dir(side).mkdir(parents=True)
            table = pa.table({"id": ids, "idx": pa.array(np.arange(len(ids), dtype=np.int32))})
            pq.write_table(table, interactions.map_dir(side) / "part-0.parquet")
        return interactions

    champion = run_with_maps("1998-04-09", "1998-04-16", ["u7", "u3"])
    run_with_maps("1998-04-16", "1998-04-23", ["u7", "u3", "u9"]).check_maps_extend(champion, "1")
    # The maps were lost and every id numbered again from 0: u3 now has u7's index.
    renumbered = run_with_maps("1998-04-23", "1998-04-30", ["u3", "u7", "u9"])
    with pytest.raises(IdMapMismatchError, match="users ID map of this run does not extend version 1's"):
        renumbered.check_maps_extend(champion, "1")
