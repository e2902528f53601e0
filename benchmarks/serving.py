"""Serving speed: the in-process client (the floor) and ``recsys serve`` over loopback, side by side.

The weekly pipeline runs once on the bundled sample into a state folder of the bench's own and
promotes its version. The in-process figures come from :class:`~recsys_pipeline.client.RecsysClient`
answering single-row requests one after another; the REST figures from ``recsys serve`` (its
``workers`` processes) under a closed-loop load of ``c`` keep-alive connections for ``seconds`` each,
at c in ``concurrency``. Server and load share the machine's cores, as a service and its callers on
one host would.

Results for single-row ``recommend`` requests: ``in_process_qps``, ``in_process_p99_ms`` and, per
concurrency c, ``rest_c{c}_qps``, ``rest_c{c}_p50_ms``, ``rest_c{c}_p99_ms``, ``rest_c{c}_errors``;
beside them the same for ``similar`` and session requests (``*_similar_*``, ``*_session_*``), the
ratio of REST at c=8 to the floor (``rest_c8_share_of_in_process``) and each worker's resident memory
(``rest_worker_rss_mb``). Then the same, in process and at c=8, prefixed ``large_``, for a version of
``large_items`` items and ``large_users`` users with random vectors, indexed and published by the
pipeline's own index and publish stages (the real bundle format and verification).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.index_search import synthetic_embeddings
from recsys_pipeline.client import RecsysClient
from recsys_pipeline.config import PipelineConfig, load_config
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.pipelines import WEEKLY, run_in_process
from recsys_pipeline.ranking import dot_top_k
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.serving import Recommender
from recsys_pipeline.stages.index import run_index
from recsys_pipeline.stages.publish import run_publish
from recsys_pipeline.state import StateLayout
from recsys_pipeline.tables import MATRIX_ARROW_SCHEMA

PARAMS: dict[str, Any] = {
    "in_process_requests": 5000,
    "seconds": 8,
    "concurrency": [1, 8, 32],
    "workers": 2,
    "k": 10,
    "session_items": 5,
    "large_items": 1_000_000,
    "large_users": 100_000,
    "factors": 64,
}
KINDS = ("recommend", "similar", "session")


def run(params: dict[str, Any]) -> dict[str, Any]:
    work = StateLayout(load_config().state_home).bench / "work" / "serving"
    shutil.rmtree(work, ignore_errors=True)
    overrides = {"state_dir": str(work / "sample"), "als.sweep": None}
    config = load_config(overrides=overrides)
    started = time.perf_counter()
    run_in_process(WEEKLY, RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "bench"))
    results: dict[str, Any] = {"setup_s": round(time.perf_counter() - started, 1)}
    results.update(measure(config, overrides, params, params["concurrency"], work / "sample"))
    results["rest_c8_share_of_in_process"] = round(results["rest_c8_qps"] / results["in_process_qps"], 3)

    # The same at a catalogue of ``large_items``: synthetic vectors, published as a run would be.
    large = {"state_dir": str(work / "large"), "als.sweep": None}
    config = load_config(overrides=large)
    started = time.perf_counter()
    version = publish_synthetic(config, params)
    results["large_setup_s"] = round(time.perf_counter() - started, 1)
    Registry(config).promote(version, "serving benchmark")
    measured = measure(config, large, params, [8], work / "large")
    results.update({f"large_{name}": value for name, value in measured.items()})
    return results


def measure(
    config: PipelineConfig,
    overrides: dict[str, Any],
    params: dict[str, Any],
    concurrency: list[int],
    work: Path,
) -> dict[str, Any]:
    """In-process and REST figures of the champion of ``config``."""
    client = RecsysClient(config)
    recommender = client.loaded().recommender
    rng = np.random.default_rng(0)
    known_users = recommender.user_ids[recommender.has_user_vector]
    users = [str(u) for u in rng.choice(known_users, 500)]
    items = [str(i) for i in rng.choice(recommender.item_ids[recommender.has_item_vector], 500)]
    sessions = [
        [str(i) for i in rng.choice(recommender.item_ids, params["session_items"], replace=False)]
        for _ in range(500)
    ]
    k = params["k"]
    rows = {
        "recommend": [{"user_id": user, "k": k} for user in users],
        "similar": [{"item_id": item, "k": k} for item in items],
        "session": [{"recent_item_ids": session, "k": k} for session in sessions],
    }
    calls = {
        "recommend": lambda i: client.recommend(users[i % 500], k),
        "similar": lambda i: client.similar(items[i % 500], k),
        "session": lambda i: client.for_session(sessions[i % 500], k),
    }
    results: dict[str, Any] = {"version": client.version, "catalogue_items": len(recommender.item_ids)}
    if recommender.similar_index is not None:
        results["similar_recall_at_10"] = similar_recall(recommender, items[:200], k)
    for kind in KINDS:
        for i in range(50):  # warm caches and code paths before timing
            calls[kind](i)
        latencies = []
        for i in range(params["in_process_requests"]):
            began = time.perf_counter()
            calls[kind](i)
            latencies.append(time.perf_counter() - began)
        prefix = "in_process" if kind == "recommend" else f"in_process_{kind}"
        results.update(summary(prefix, np.array(latencies), sum(latencies), 0))

    server, port = start_server(work, overrides, params["workers"])
    try:
        results["rest_worker_rss_mb"] = worker_rss_mb(server.pid)
        for concurrency_level in concurrency:
            for kind in KINDS:
                bodies = [json.dumps({"dataframe_records": [row]}).encode() for row in rows[kind]]
                asyncio.run(closed_loop(port, bodies, concurrency_level, 1.0))  # warm-up, not counted
                latencies, errors, elapsed = asyncio.run(
                    closed_loop(port, bodies, concurrency_level, params["seconds"])
                )
                prefix = f"rest_c{concurrency_level}" + ("" if kind == "recommend" else f"_{kind}")
                results.update(summary(prefix, latencies, elapsed, errors))
    finally:
        server.terminate()
        server.wait(30)
    return results


def similar_recall(recommender: Recommender, items: list[str], k: int) -> float:
    """Recall@k of the similar-items index against the exact cosine scan, over ``items``."""
    found = []
    for item in items:
        idx = recommender.item_lookup[item]
        allowed = recommender.has_item_vector.copy()
        allowed[idx] = False
        exact, _ = dot_top_k(
            recommender.item_directions[idx][None, :], recommender.item_directions, k, allowed=allowed
        )
        approximate, _ = recommender.similar_ranked(item, k)
        found.append(len(np.intersect1d(exact[0], approximate)) / k)
    return round(float(np.mean(found)), 4)


def publish_synthetic(config: PipelineConfig, params: dict[str, Any]) -> str:
    """A weekly run's outputs with ``large_items`` items and ``large_users`` users of synthetic vectors,
    indexed by the index stage and published by the publish stage: the real bundle, the real
    verification."""
    rng = np.random.default_rng(1)
    n_users, n_items, factors = params["large_users"], params["large_items"], params["factors"]
    run = RunContext.create(config, "recsys_weekly", "2000-01-01", "2000-01-08", "bench_large")
    artifacts = run.artifacts
    for side, size in (("users", n_users), ("items", n_items)):
        folder = artifacts.interactions.map_dir(side)
        folder.mkdir(parents=True)
        ids = pa.array([f"{side[0]}{i}" for i in range(size)], pa.string())
        pq.write_table(
            pa.table({"id": ids, "idx": pa.array(np.arange(size, dtype=np.int32))}), folder / "part-0.parquet"
        )
    history = 5 * n_users  # five items per user: what the lists leave out
    artifacts.interactions.train_dir.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "user_idx": np.repeat(np.arange(n_users, dtype=np.int32), 5),
                "item_idx": rng.integers(0, n_items, history).astype(np.int32),
                "confidence": np.ones(history, np.float32),
            },
            schema=MATRIX_ARROW_SCHEMA,
        ),
        artifacts.interactions.train_dir / "part-0.parquet",
    )
    artifacts.interactions.write_fingerprint("synthetic")
    # Clustered directions with log-normal norms, as the index benchmark draws them: random Gaussian
    # vectors have no neighbourhoods for a tree to find, which no trained model produces.
    item_factors, user_factors = synthetic_embeddings(n_items, factors, n_users, seed=1)
    embeddings = Embeddings(np.arange(n_users), user_factors, np.arange(n_items), item_factors)
    als = config.als.model_copy(update={"factors": factors, "popularity_weight": 0.0})
    artifacts.write_trained(embeddings, [0.0], als)
    run_index(run)
    artifacts.validation_dir.mkdir(parents=True)
    return run_publish(run)


def summary(prefix: str, latencies: np.ndarray, elapsed_s: float, errors: int) -> dict[str, float]:
    return {
        f"{prefix}_qps": round(len(latencies) / elapsed_s, 1),
        f"{prefix}_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        f"{prefix}_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3),
        **({} if prefix.startswith("in_process") else {f"{prefix}_errors": errors}),
    }


def start_server(work: Path, overrides: dict[str, Any], workers: int) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recsys = str(Path(sys.executable).parent / "recsys")
    sets = [arg for name, value in overrides.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [recsys, *sets, "serve", "--port", str(port), "--workers", str(workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                # Every worker must have loaded its version: ask a few times over fresh connections.
                for _ in range(4 * workers):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=60).close()
                return server, port
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"recsys serve exited; see {work / 'serve.log'}") from None
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"recsys serve did not answer in 180 s; see {work / 'serve.log'}")


def worker_rss_mb(pid: int) -> list[float]:
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return [round(child.memory_info().rss / 2**20, 1) for child in children] or [
        round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    ]


async def closed_loop(
    port: int, bodies: list[bytes], concurrency: int, seconds: float
) -> tuple[np.ndarray, int, float]:
    """``concurrency`` keep-alive connections, each sending its next request when the last is
    answered, for ``seconds``: (latencies, non-200 answers and failures, elapsed seconds)."""
    latencies: list[float] = []
    errors = 0
    began = time.perf_counter()
    deadline = began + seconds

    async def connection(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = offset
        try:
            while time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += concurrency
                request = (
                    b"POST /invocations HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                start = time.perf_counter()
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not status.startswith(b"HTTP/1.1 200"):
                    errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(offset) for offset in range(concurrency)))
    return np.array(latencies), errors, time.perf_counter() - began
