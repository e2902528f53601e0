"""Erasure: the ledger keeps only salted hashes; rewrites remove exactly the forgotten users' rows;
the verifier finds an id wherever a file holds it."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from recsys_pipeline.artifacts import TRAIN_CSR
from recsys_pipeline.embeddings import write_factors
from recsys_pipeline.erasure import (
    ErasureError,
    ErasureLedger,
    erase_rows,
    parquet_files,
    scrub_tree,
    tombstone_ids,
    verify,
)
from recsys_pipeline.files import publish_snapshot
from recsys_pipeline.stages.forget import run_state_erasure
from recsys_pipeline.state import StateLayout
from recsys_pipeline.tables import read_csr, write_csr

pytestmark = pytest.mark.unit

GONE, STAYS = "user-000196", "user-000197"


def ledger_for(tmp_path: Path, *ids: str) -> ErasureLedger:
    ledger = ErasureLedger(StateLayout(tmp_path / "state"))
    ledger.record(list(ids), "asked by email")
    return ledger


def test_the_ledger_holds_salted_hashes_and_never_an_id(tmp_path: Path) -> None:
    ledger = ErasureLedger(StateLayout(tmp_path / "state"))
    first = ledger.record([GONE, f" {GONE} ", ""], "asked by email")
    second = ledger.record([STAYS], "")
    assert len(first.user_hashes) == 1 and first.request_id != second.request_id
    text = ledger.path.read_text()
    assert GONE not in text and STAYS not in text and "asked by email" in text
    assert stat.S_IMODE((ledger.folder / "salt").stat().st_mode) == 0o600
    assert ledger.request(first.request_id) == first
    forgotten = ledger.forgotten()
    assert forgotten is not None and forgotten.matches(GONE) and forgotten.matches(STAYS)
    assert not forgotten.matches("user-000198")
    # Another state draws another salt: the same id hashes differently there.
    other = ErasureLedger(StateLayout(tmp_path / "other")).record([GONE], "")
    assert other.user_hashes != first.user_hashes
    with pytest.raises(ErasureError, match="no erasure request"):
        ledger.request("forget-unknown")
    with pytest.raises(ErasureError, match="at least one"):
        ledger.record(["  "], "")


def test_ids_are_found_inside_serialised_records_and_replaced_in_text(tmp_path: Path) -> None:
    forgotten = ledger_for(tmp_path, GONE).forgotten()
    assert forgotten is not None
    record = json.dumps({"user": GONE, "item": "42", "ts": "x"})
    assert forgotten.matching([record, f"{STAYS},42,view", f"{GONE}\t42\tview"]) == {
        record,
        f"{GONE}\t42\tview",
    }
    assert forgotten.scrubbed(f"served {GONE} and {STAYS}: ok") == f"served [erased] and {STAYS}: ok"
    assert not forgotten.matches(f"{GONE}x")


def write_lake(lake: Path) -> dict[str, Path]:
    files = {}
    for day, users in (("1998-04-20", [GONE, STAYS, GONE]), ("1998-04-21", [STAYS, STAYS])):
        folder = lake / f"event_date={day}"
        folder.mkdir(parents=True)
        table = pa.table(
            {"user_id": users, "item_id": ["1", "2", "3"][: len(users)], "value": [1.0] * len(users)}
        )
        pq.write_table(
            table.replace_schema_metadata({"org.apache.spark.version": "4.2.0"}), folder / "part-0.parquet"
        )
        files[day] = folder / "part-0.parquet"
    (lake / "_source_ledger.json").write_text("{}")
    return files


def test_only_the_files_holding_a_forgotten_user_are_rewritten(tmp_path: Path) -> None:
    forgotten = ledger_for(tmp_path, GONE).forgotten()
    assert forgotten is not None
    files = write_lake(tmp_path / "lake")
    untouched = files["1998-04-21"].stat().st_mtime_ns
    # Spark's local writes leave a Hadoop checksum beside each file; a stale one fails every read.
    checksums = {day: path.with_name(f".{path.name}.crc") for day, path in files.items()}
    for checksum in checksums.values():
        checksum.write_bytes(b"crc")
    done = erase_rows(parquet_files(tmp_path / "lake"), ["user_id"], forgotten)
    assert (done.files_rewritten, done.rows_removed, len(done.partitions)) == (1, 2, 1)
    rewritten = pq.read_table(files["1998-04-20"])
    assert rewritten.column("user_id").to_pylist() == [STAYS]
    assert rewritten.column("item_id").to_pylist() == ["2"]
    assert rewritten.schema.metadata == {b"org.apache.spark.version": b"4.2.0"}
    assert files["1998-04-21"].stat().st_mtime_ns == untouched
    assert not checksums["1998-04-20"].exists() and checksums["1998-04-21"].exists()
    # Nothing is left to do a second time.
    assert erase_rows(parquet_files(tmp_path / "lake"), ["user_id"], forgotten).files_rewritten == 0


def test_an_erasure_reaches_a_lake_date_a_crash_left_set_aside(make_config) -> None:
    config = make_config()
    layout = StateLayout.of(config)
    request_id = ErasureLedger(layout).record([GONE], "asked by email").request_id
    files = write_lake(layout.events_lake)
    # A kill between the two renames of an ingest's swap of the date (events.copy_accepted).
    aside = layout.events_lake / ".event_date=1998-04-20.old-0badf00d"
    files["1998-04-20"].parent.rename(aside)

    assert run_state_erasure(config, request_id)["events_erased"] == 2
    assert not aside.exists()
    assert pq.read_table(files["1998-04-20"]).column("user_id").to_pylist() == [STAYS]


def test_a_run_folder_is_scrubbed_and_the_shared_map_keeps_a_tombstone(tmp_path: Path) -> None:
    forgotten = ledger_for(tmp_path, GONE).forgotten()
    assert forgotten is not None
    users_map = pa.table({"id": [STAYS, GONE, "user-000198"], "idx": pa.array([0, 1, 2], pa.int32())})
    items_map = pa.table({"id": ["1", GONE], "idx": pa.array([0, 1], pa.int32())})  # an item named alike

    def write_map(folder: Path) -> None:
        folder.mkdir(parents=True)
        pq.write_table(users_map, folder / "part-00000.parquet")

    pointer = tmp_path / "id_maps" / "users"
    publish_snapshot(pointer, write_map)
    tombstoned, indices = tombstone_ids(pointer, forgotten)
    assert tombstoned == 1 and indices.to_pylist() == [1]
    shared = pq.read_table(pointer)
    assert shared.column("id").to_pylist() == [STAYS, None, "user-000198"]
    assert shared.column("idx").to_pylist() == [0, 1, 2]  # the index stays taken

    run = tmp_path / "run"
    (run / "bundle" / "id_maps").mkdir(parents=True)
    (run / "bundle" / "embeddings").mkdir(parents=True)
    pq.write_table(users_map, run / "bundle" / "id_maps" / "users.parquet")
    pq.write_table(items_map, run / "bundle" / "id_maps" / "items.parquet")
    write_factors(run / "bundle" / "embeddings" / "user_factors.parquet", np.arange(3), np.eye(3))
    history = pa.table(
        {"user_idx": pa.array([0, 1, 1, 2], pa.int32()), "item_idx": pa.array([0, 0, 1, 1], pa.int32())}
    )
    pq.write_table(history, run / "bundle" / "history.parquet")
    train = sp.csr_matrix((np.ones(4, np.float32), ([0, 1, 1, 2], [0, 0, 1, 1])), shape=(3, 2))
    write_csr(train, run / "interactions" / TRAIN_CSR)
    write_csr(train, run / "interactions" / f".{TRAIN_CSR}.old-1a2b3c4d")  # a crash's leftover
    lists = pa.table({"user_id": [GONE, STAYS], "rank": [1, 1], "item_id": ["1", "1"]})
    pq.write_table(lists, run / "bundle" / "recommendations.parquet")
    (run / "metrics.json").write_text(json.dumps({"sample": [GONE, STAYS], "count": 196}))
    (run / "task.log").write_text(f"recommended for {GONE}\n")

    done = scrub_tree(run, forgotten, indices)
    assert done.ids_tombstoned == 1
    assert pq.read_table(run / "bundle" / "id_maps" / "users.parquet").column("id").to_pylist() == [
        STAYS,
        None,
        "user-000198",
    ]
    assert pq.read_table(run / "bundle" / "id_maps" / "items.parquet").equals(items_map)
    assert pq.read_table(run / "bundle" / "embeddings" / "user_factors.parquet").column(
        "idx"
    ).to_pylist() == [0, 2]
    assert pq.read_table(run / "bundle" / "history.parquet").column("user_idx").to_pylist() == [0, 2]
    scrubbed = read_csr(run / "interactions" / TRAIN_CSR, 2)
    assert scrubbed.toarray().tolist() == [[1, 0], [0, 0], [0, 1]]
    assert [path.name for path in (run / "interactions").iterdir()] == [TRAIN_CSR]
    assert pq.read_table(run / "bundle" / "recommendations.parquet").column("user_id").to_pylist() == [STAYS]
    assert json.loads((run / "metrics.json").read_text()) == {"sample": ["[erased]", STAYS], "count": 196}
    assert (run / "task.log").read_text() == "recommended for [erased]\n"
    assert verify([run], forgotten).clean


def test_the_verifier_finds_an_id_in_every_kind_of_file(tmp_path: Path) -> None:
    forgotten = ledger_for(tmp_path, GONE).forgotten()
    assert forgotten is not None
    root = tmp_path / "scanned"
    root.mkdir()
    pq.write_table(pa.table({"raw_record": [json.dumps({"u": GONE})]}), root / "quarantine.parquet")
    pq.write_table(pa.table({"item_id": [GONE], "n": [1]}), root / "items_named_alike.parquet")
    (root / "report.json").write_text(json.dumps({"unexpected": [GONE]}))
    (root / "task.log").write_text(f"INFO user {GONE}\n")
    np.save(root / "ids.npy", np.array([GONE, STAYS]))
    with sqlite3.connect(root / "airflow.db") as database:
        database.execute("CREATE TABLE xcom (value TEXT)")
        database.execute("INSERT INTO xcom VALUES (?)", (json.dumps({"user_id": GONE}),))
    (root / "clean.json").write_text(json.dumps({"user_id": STAYS}))
    found = verify([root], forgotten)
    assert sorted(Path(finding.path).name for finding in found.findings) == [
        "airflow.db",
        "ids.npy",
        "quarantine.parquet",
        "report.json",
        "task.log",
    ]
    assert found.files_checked == 7
    assert verify([root], forgotten, skip=[root]).files_checked == 0


def test_a_request_without_ids_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from recsys_pipeline.cli import main

    state = ["--set", f"state_dir={tmp_path / 'state'}"]
    assert main([*state, "forget", "--user-ids-file", str(tmp_path / "missing.txt")]) == 1
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main([*state, "forget", "--user-ids-file", str(tmp_path / "empty.txt")]) == 1
    assert "at least one non-empty user id" in capsys.readouterr().err
    assert not (tmp_path / "state" / "erasure" / "ledger.jsonl").exists()
