"""Forgetting ``users`` users from a production-sized state, as ``recsys forget`` does.

The state is the pipeline benchmark's first week: the synthetic log (cached under
``<state>/bench/data/``, shared with ``pipeline``) and one weekly DAG run over it. Then ``users``
users picked at random among those the weekly mapped are forgotten in one request: the
``recsys_forget`` DAG erases them from the state, republishes the champion and verifies.

Results: ``events``, ``users_forgotten``, ``weekly_ok``, ``forget_ok``, ``forget_s`` (the whole
request, CLI to verified report), ``erase_state_s``, ``republish_s``, ``verify_s`` (each stage's own
time), ``events_erased``, ``lake_partitions_rewritten``, ``lake_partitions``,
``lake_bytes_rewritten``, ``lake_bytes`` and ``lake_share_rewritten`` (bytes rewritten over the
lake's size), ``verified_files`` and ``verified_strings``; then the following week of the same
world's log lands in the source and the weekly runs again: ``weekly_after_s``, ``weekly_after_ok``,
``events_erased_at_ingest`` (the forgotten users' events, old and new, counted and kept nowhere) and
``clean_after_weekly`` (the verifier still finds none of them in the state).
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import date, timedelta
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.pipeline import PARAMS as PIPELINE_PARAMS
from benchmarks.pipeline import RECSYS, cached_source, fresh_state, land_following_week, spec_of, timed_dag
from recsys_pipeline.config import load_config
from recsys_pipeline.erasure import ErasureLedger, verify
from recsys_pipeline.events import lake_partitions
from recsys_pipeline.state import StateLayout

PARAMS: dict[str, Any] = {**PIPELINE_PARAMS, "forget_users": 1000, "seed": 0}


def run(params: dict[str, Any]) -> dict[str, Any]:
    layout = StateLayout(load_config().state_home)
    spec = spec_of(params)
    bench = fresh_state(layout, "forget", cached_source(spec, layout.bench / "data"))
    work, state, env = bench.work, bench.state, bench.env
    last_day = date.fromisoformat(params["start"]) + timedelta(days=params["days"] - 1)
    weekly_s, weekly_ok = timed_dag("recsys_weekly", last_day.isoformat(), env, work / "weekly.log")
    print(f"  weekly: {weekly_s:.0f} s ({'ok' if weekly_ok else 'FAILED, see ' + str(work / 'weekly.log')})")
    results: dict[str, Any] = {"events": params["events"], "weekly_ok": weekly_ok}
    if not weekly_ok:
        return results
    (first_weekly,) = [path for path in (state / "runs" / "recsys_weekly").iterdir() if path.is_dir()]

    ids = pq.read_table(state / "id_maps" / "users", columns=["id"]).column("id").to_pylist()
    picked = np.random.default_rng(params["seed"]).choice(len(ids), params["forget_users"], replace=False)
    ids_file = work / "forget_ids.txt"
    ids_file.write_text("\n".join(ids[i] for i in sorted(picked)) + "\n")
    started = time.perf_counter()
    with (work / "forget.log").open("w") as out:
        forgot = subprocess.run(
            [RECSYS, "forget", "--user-ids-file", str(ids_file), "--reason", "benchmark"],
            env=env,
            stdout=out,
            stderr=out,
        )
    forget_s = time.perf_counter() - started
    ids_file.unlink()
    outcome = "ok" if forgot.returncode == 0 else f"FAILED, see {work / 'forget.log'}"
    print(f"  forget {params['forget_users']} users: {forget_s:.0f} s ({outcome})")
    (request,) = (state / "runs" / "recsys_forget").iterdir()
    report = json.loads((request / "report" / "report.json").read_text())
    erased, republished = report["erased"]["state"], report["erased"]["republish"]
    results |= {
        "users_forgotten": params["forget_users"],
        "forget_ok": forgot.returncode == 0,
        "forget_s": forget_s,
        "erase_state_s": erased["erase_state_s"],
        "republish_s": republished["republish_s"],
        "verify_s": report["metrics"]["verify_s"],
        "events_erased": erased["events_erased"],
        "lake_partitions_rewritten": erased["lake_partitions_rewritten"],
        "lake_partitions": float(len(lake_partitions(state / "lake" / "events"))),
        "lake_bytes_rewritten": erased["lake_bytes_rewritten"],
        "lake_bytes": erased["lake_bytes"],
        "lake_share_rewritten": erased["lake_bytes_rewritten"] / max(erased["lake_bytes"], 1.0),
        "verified_files": report["metrics"]["verified_files"],
        "verified_strings": report["metrics"]["verified_strings"],
    }

    # The following week lands (the forgotten users have new events in it too) and the weekly reads
    # the source again: their events are erased on the way in, and the state stays clean.
    steady_date = land_following_week(spec, last_day, layout, bench.source)
    after_s, after_ok = timed_dag("recsys_weekly", steady_date, env, work / "weekly_after.log")
    print(f"  weekly, the week after: {after_s:.0f} s ({'ok' if after_ok else 'FAILED'})")
    forgotten = ErasureLedger(StateLayout(state)).forgotten()
    assert forgotten is not None
    (ingest,) = [
        json.loads(path.read_text())
        for path in (state / "runs" / "recsys_weekly").glob("*/*/metrics/ingest.json")
        if not path.is_relative_to(first_weekly)
    ]
    results |= {
        "weekly_after_s": after_s,
        "weekly_after_ok": after_ok,
        "events_erased_at_ingest": ingest["events_erased_at_ingest"],
        "clean_after_weekly": verify([state], forgotten, skip=[state / "erasure"]).clean,
    }
    return results
