"""Spark interactions job against a single-process pyarrow implementation of the same aggregation.

Both read the same synthetic events from the lake and end with a CSR matrix: confidence
weights per event type (watch scaled by its value), sum per (user, item), cap, dense ids.
The Spark side is the pipeline's own stage (which also writes the holdout and ID maps) at the
pipeline's default holdout (``holdout``): its driver aggregates a window of up to
``spark.driver_max_events``, so its memory is this process's with the JVM's.
Results: ``events``, ``spark_events_per_s``, ``baseline_events_per_s``, ``spark_peak_rss_mb``,
``spark_vs_baseline`` (throughput ratio, < 1 means Spark is slower).

Each side runs ``repeats`` times (the baseline after the Spark JVM has exited) and keeps its
fastest run, as ``timeit`` does: the minimum is the run the rest of the machine disturbed least
(single runs here vary by 15-20%). Every Spark run starts without ID maps or a pair history to
carry, so each assigns every index and aggregates every event. The first Spark run also pays the
JVM's JIT warm-up, as a fresh ``spark-submit`` does: it is reported as ``spark_first_run_s``, every
run's time as ``spark_runs_s`` and ``baseline_runs_s``.
"""

from __future__ import annotations

import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import scipy.sparse as sp

from recsys_pipeline.config import InteractionsConfig, load_config
from recsys_pipeline.files import write_json
from recsys_pipeline.runs import RunContext
from recsys_pipeline.spark import spark_session
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.stages.interactions import run_interactions
from recsys_pipeline.state import StateLayout
from recsys_pipeline.synthetic import SOURCE_MAPPING, SyntheticSpec, generate

PARAMS: dict[str, Any] = {
    "events": 20_000_000,
    "users": 500_000,
    "items": 100_000,
    "days": 28,
    "spark_master": "local[2]",
    # The pipeline's default (conf/pipeline.yaml): the peak memory measured is then a run's.
    "spark_driver_memory": "4g",
    # The pipeline's default holdout (each user's latest pairs), whose pairs the driver aggregates up to
    # spark.driver_max_events; "days" holds out the window's last day, by Spark.
    "holdout": "per_user_last",
    "repeats": 2,
}


class PeakRss:
    """Peak resident memory of this process and its children, sampled in a thread: the stage's driver
    (whose Arrow and NumPy work runs in this process, as in a task's) and the Spark JVM.

    A child with its parent's virtual size is a copy of its parent, whose pages are the parent's until
    written: the JVM spawning a command (Hadoop's local file system runs some while a task writes)
    reports the JVM's resident size as the command's own until it runs. Such a child is not counted:
    counted, it made some runs read twice the JVM (6.6-7.4 GB for 3.4-4.6).
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            sizes: dict[int, tuple[int, int, int]] = {}  # pid: (its parent, virtual size, resident)
            for process in (me, *me.children(recursive=True)):
                try:
                    used = process.memory_info()
                    sizes[process.pid] = (process.ppid(), used.vms, used.rss)
                except psutil.Error:
                    continue
            total = 0
            for parent, virtual, resident in sizes.values():
                # The parent's whole address space (the same virtual size): a spawn not yet running.
                if parent in sizes and virtual == sizes[parent][1]:
                    continue
                total += resident
            self.peak = max(self.peak, total)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def pyarrow_csr(lake: Path, start: datetime, end: datetime, config: InteractionsConfig) -> sp.csr_matrix:
    table = ds.dataset(str(lake), format="parquet", partitioning="hive").to_table(
        columns=["user_id", "item_id", "event_type", "value"],
        filter=(ds.field("event_ts") >= start) & (ds.field("event_ts") < end),
    )
    types = table.column("event_type").combine_chunks().dictionary_encode()
    names = types.dictionary.to_pylist()
    weight = np.array([config.event_weights[name].weight for name in names], dtype=np.float64)
    scaled = np.array([config.event_weights[name].scale_by_value for name in names])
    codes = types.indices.to_numpy()
    values = table.column("value").to_numpy()
    confidence = weight[codes] * np.where(scaled[codes], np.nan_to_num(values), 1.0)
    summed = (
        pa.table({"u": table.column("user_id"), "i": table.column("item_id"), "c": confidence})
        .group_by(["u", "i"])
        .aggregate([("c", "sum")])
    )
    users = summed.column("u").combine_chunks().dictionary_encode()
    items = summed.column("i").combine_chunks().dictionary_encode()
    capped = np.minimum(summed.column("c_sum").to_numpy(), config.max_confidence).astype(np.float32)
    return sp.csr_matrix(
        (capped, (users.indices.to_numpy(), items.indices.to_numpy())),
        shape=(len(users.dictionary), len(items.dictionary)),
    )


def run(params: dict[str, Any]) -> dict[str, Any]:
    work = StateLayout(load_config().state_home).bench / "work" / "interactions"
    spec = SyntheticSpec(
        events=params["events"], users=params["users"], items=params["items"], days=params["days"]
    )
    source = work / "source"
    if not (work / "spec.json").is_file() or (work / "spec.json").read_text() != str(spec.as_dict()):
        generate(spec, source)
        (work / "spec.json").write_text(str(spec.as_dict()))
    config = load_config(
        overrides={
            "state_dir": str(work / "state"),
            "source": {
                "name": "synthetic",
                "path": str(source),
                "format": "parquet",
                "mapping": SOURCE_MAPPING,
            },
            "interactions.holdout.strategy": params["holdout"],
            "interactions.holdout.days": 1,
            "interactions.min_item_interactions": 1,
            "spark.conf": {
                **load_config().spark.conf,
                "spark.sql.shuffle.partitions": "16",
                "spark.driver.memory": params["spark_driver_memory"],
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
            },
        }
    )
    end = datetime.fromisoformat(spec.start) + timedelta(days=spec.days)
    bench_run = RunContext.create(config, "bench", end - timedelta(days=spec.days), end)
    spark = spark_session(config, "bench-interactions", params["spark_master"])
    window_start, window_end = bench_run.interval_start, bench_run.interval_end
    spark_runs, baseline_runs = [], []
    try:
        run_ingest(spark, bench_run)
        with PeakRss() as memory:
            for _ in range(params["repeats"]):
                shutil.rmtree(bench_run.layout.id_maps, ignore_errors=True)
                bench_run.layout.pair_history.unlink(missing_ok=True)
                started = time.perf_counter()
                metrics = run_interactions(spark, bench_run)
                matrix = bench_run.artifacts.interactions.train_triples()
                csr = matrix.to_csr(int(metrics["users"]), int(metrics["items"]))
                spark_runs.append(time.perf_counter() - started)
    finally:
        spark.stop()
    for _ in range(params["repeats"]):
        started = time.perf_counter()
        baseline = pyarrow_csr(bench_run.layout.events_lake, window_start, window_end, config.interactions)
        baseline_runs.append(time.perf_counter() - started)
    spark_s, baseline_s = min(spark_runs), min(baseline_runs)
    events = int(metrics["window_events"])
    write_json(work / "last_shapes.json", {"spark_nnz": csr.nnz, "baseline_nnz": baseline.nnz})
    return {
        "events": events,
        "spark_events_per_s": events / spark_s,
        "baseline_events_per_s": events / baseline_s,
        "spark_vs_baseline": baseline_s / spark_s,
        "spark_peak_rss_mb": memory.peak / 2**20,
        "spark_s": spark_s,
        "baseline_s": baseline_s,
        "spark_first_run_s": spark_runs[0],
        "spark_runs_s": spark_runs,
        "baseline_runs_s": baseline_runs,
        "spark_nnz_train": csr.nnz,
        "baseline_nnz_all": baseline.nnz,
    }
