"""ScaNN against exact search and against the ANN libraries a service author already knows.

Catalogues of synthetic 64-d item vectors shaped like ALS factors: items share a latent cluster
structure (genres), and item norms spread log-normally (popular items have larger ones), so maximum
inner product search favours heavy items as ALS scoring does. Queries are held-out user-like vectors.

For each catalogue size and metric (``dot_product``, as ALS scores, and ``cosine``), ScaNN is built
with the pipeline's own size-derived configuration and its search setting chosen from the measured
recall/latency curve (``recsys_pipeline.index.build_tuned``). Results per item count (the
``dot_product`` run; ``cosine`` under ``"cosine"``): ``recall_at_10``, ``qps`` (batched), ``exact_qps``,
``speedup``, ``build_s``, ``p50_ms``/``p99_ms`` (one query at a time, one thread), ``index_mb`` (on
disk), ``rss_mb`` (resident memory the index added), ``peers`` ({name: {``recall_at_10``, ``p99_ms``,
``build_s``}} at the first matched recall), ``matched`` ({recall: {library: p99_ms}}) and
``scann_vs_best_peer`` (the best peer's p99 over ScaNN's at that recall: above 1, ScaNN is faster).
Peers (Faiss HNSW and IVF-PQ with exact re-ranking, hnswlib) run when installed (``pip install
-e '.[bench]'``) and when their build fits ``peer_max_items``. ``index.png`` beside the JSON plots
recall against p99 latency over each library's tuning grid.
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from recsys_pipeline.config import IndexConfig, load_config
from recsys_pipeline.index import (
    LATENCY_QUERIES,
    ScannIndex,
    build_tuned,
    choose_point,
    exact_top_k,
    index_vectors,
    recall_at_k,
    tuning_curve,
)
from recsys_pipeline.state import StateLayout

PARAMS: dict[str, Any] = {
    "item_counts": [100_000, 1_000_000, 10_000_000],
    "dims": 64,
    "queries": 1000,
    "k": 10,
    "seed": 0,
    "matched_recall": [0.95, 0.99],
    # HNSW builds take hours at 10M items on 2 cores: graph peers stop here, IVF-PQ goes on.
    "peer_max_items": {"faiss_hnsw": 1_000_000, "hnswlib": 1_000_000, "faiss_ivfpq": 10_000_000},
    "cosine_max_items": 10_000_000,
}
# A search whose one-query p99 passes this is not worth walking further along a grid.
GRID_CEILING_MS = 50.0


def synthetic_embeddings(n_items: int, dims: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(items, queries): clustered directions with log-normal norms."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, n_items // 1000), dims)).astype(np.float32)
    items = np.empty((n_items, dims), dtype=np.float32)
    for start in range(0, n_items, 1_000_000):  # in blocks: no float64 copy of a 10M catalogue
        stop = min(start + 1_000_000, n_items)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += 0.5 * rng.normal(size=block.shape).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        # Log-normal norms (ALS gives popular items larger ones): a 10x spread between the 1st and 99th
        # percentile, so inner product search leans towards the heavy items as ALS scoring does.
        block *= np.exp(0.5 * rng.normal(size=(stop - start, 1))).astype(np.float32)
        items[start:stop] = block
    queries = centres[rng.integers(0, len(centres), n_queries)] + 0.5 * rng.normal(size=(n_queries, dims))
    return items, queries.astype(np.float32)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def folder_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def latency_ms(search_one: Callable[[np.ndarray], Any], queries: np.ndarray) -> tuple[float, float]:
    timings = []
    for query in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        search_one(query)
        timings.append(time.perf_counter() - started)
    p50, p99 = np.percentile(np.asarray(timings) * 1000, [50, 99])
    return float(p50), float(p99)


class Peer:
    """One ANN library: ``build`` returns a search function taking (queries, k, knob)."""

    def __init__(self, name: str, knobs: list[int], build: Callable[[np.ndarray], Callable[..., np.ndarray]]):
        self.name, self.knobs, self.build = name, knobs, build


def faiss_hnsw(items: np.ndarray) -> Callable[..., np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(items.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 100
    index.add(items)

    def search(queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        index.hnsw.efSearch = max(ef, k)
        return index.search(queries, k)[1]

    return search


def faiss_ivfpq(items: np.ndarray) -> Callable[..., np.ndarray]:
    import faiss

    nlist = int(4 * np.sqrt(len(items)))
    base = faiss.index_factory(items.shape[1], f"IVF{nlist},PQ32", faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(base)  # exact re-ranking of the PQ candidates, as ScaNN's reorder
    rng = np.random.default_rng(0)
    sample = items[rng.choice(len(items), min(len(items), 40 * nlist, 256_000), replace=False)]
    index.train(sample)
    for start in range(0, len(items), 1_000_000):
        index.add(items[start : start + 1_000_000])
    ivf = faiss.extract_index_ivf(base)

    def search(queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        ivf.nprobe = nprobe
        index.k_factor = 20
        return index.search(queries, k)[1]

    return search


def hnswlib_index(items: np.ndarray) -> Callable[..., np.ndarray]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=items.shape[1])
    index.init_index(max_elements=len(items), ef_construction=100, M=16)
    index.add_items(items, np.arange(len(items)), num_threads=2)
    index.set_num_threads(1)

    def search(queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        index.set_ef(max(ef, k))
        return index.knn_query(queries, k)[0]

    return search


PEERS = [
    Peer("faiss_hnsw", [10, 16, 32, 64, 128, 256, 512, 1024], faiss_hnsw),
    Peer("faiss_ivfpq", [1, 2, 4, 8, 16, 32, 64, 128, 256], faiss_ivfpq),
    Peer("hnswlib", [10, 16, 32, 64, 128, 256, 512, 1024], hnswlib_index),
]
PEER_MODULES = {"faiss_hnsw": "faiss", "faiss_ivfpq": "faiss", "hnswlib": "hnswlib"}


def run_peer(
    peer: Peer, items: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, targets: list[float]
) -> dict[str, Any]:
    """The peer's build time and its curve; per target recall, the cheapest knob reaching it."""
    started = time.perf_counter()
    search = peer.build(items)
    build_s = time.perf_counter() - started
    curve, matched = [], {}
    for knob in peer.knobs:
        recall = recall_at_k(search(queries, k, knob), truth)
        p50, p99 = latency_ms(lambda q, knob=knob: search(q[None, :], k, knob), queries)
        curve.append({"setting": f"{knob}", "recall": recall, "p99_ms": p99})
        for target in targets:
            if recall >= target and str(target) not in matched:
                matched[str(target)] = {"recall_at_10": recall, "p99_ms": p99, "p50_ms": p50, "knob": knob}
        if recall >= max(targets) or p99 > GRID_CEILING_MS:
            break
    return {"build_s": build_s, "curve": curve, "matched": matched}


def run_scann(
    items: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, metric: str, targets: list[float]
) -> dict[str, Any]:
    before = rss_mb()
    index, metrics, curve = build_tuned(np.arange(len(items)), items, queries, IndexConfig(metric=metric), k)
    added_mb = rss_mb() - before
    with tempfile.TemporaryDirectory() as folder:
        index.save(Path(folder))
        on_disk = folder_mb(Path(folder))
    matched = (
        {str(target): scann_at_recall(index, queries, truth, k, target) for target in targets}
        if isinstance(index, ScannIndex)
        else {}
    )
    result = {
        "recall_at_10": metrics[f"index_recall_at_{k}"],
        "qps": metrics["index_qps"],
        "exact_qps": metrics["exact_qps"],
        "speedup": metrics["index_qps"] / metrics["exact_qps"],
        "build_s": metrics["index_build_s"],
        "p50_ms": metrics["index_p50_ms"],
        "p99_ms": metrics["index_p99_ms"],
        "index_mb": on_disk,
        "rss_mb": added_mb,
        "setting": index.params.as_dict() if isinstance(index, ScannIndex) else {},
        "scann_matched": matched,
    }
    if isinstance(index, ScannIndex):
        # The points the pipeline's own tuning measured (leaves searched x reorder depth).
        result["curve"] = [
            {
                "setting": f"leaves {point.params.leaves_to_search}/{point.params.num_leaves} "
                f"reorder {point.params.reorder}",
                "recall": point.recall,
                "p99_ms": point.p99_ms,
            }
            for point in curve
        ]
        if metric == "dot_product":
            started = time.perf_counter()
            result["upsert_recall_at_10"] = upsert_recall(index, items, queries, k)
            result["upsert_s"] = time.perf_counter() - started
    return result


def upsert_recall(
    index: ScannIndex, items: np.ndarray, queries: np.ndarray, k: int, share: float = 0.01
) -> float:
    """Recall after a nightly-sized update: ``share`` of the vectors moved and upserted in place.
    ``items`` is changed for the measurement and restored."""
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(items), int(len(items) * share), replace=False))
    original = items[rows].copy()
    scale = np.linalg.norm(original, axis=1, keepdims=True) / np.sqrt(items.shape[1])
    moved = (original + 0.5 * scale * rng.normal(size=original.shape)).astype(np.float32)
    index.upsert(rows, moved)
    items[rows] = moved
    try:
        found, _ = index.search(queries, k)
        return recall_at_k(found, exact_top_k(queries, items, k))
    finally:
        items[rows] = original


def scann_at_recall(
    index: ScannIndex, queries: np.ndarray, truth: np.ndarray, k: int, target: float
) -> dict[str, float]:
    """ScaNN's chosen point for another recall target, on the index already built (no rebuild)."""
    config = IndexConfig(min_recall=target, max_p99_ms=GRID_CEILING_MS)
    chosen = choose_point(tuning_curve(index, queries, truth, config, k), config)
    return {"recall_at_10": chosen.recall, "p99_ms": chosen.p99_ms, "p50_ms": chosen.p50_ms}


def run(params: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    k, targets = params["k"], params["matched_recall"]
    plot_path = (
        StateLayout(load_config().state_home).bench / "index.png"
    )  # read now: a long run outlives edits
    available = {name for name, module in PEER_MODULES.items() if importlib.util.find_spec(module)}
    for n_items in params["item_counts"]:
        items, queries = synthetic_embeddings(n_items, params["dims"], params["queries"], params["seed"])
        truth = exact_top_k(queries, items, k)
        entry = run_scann(items, queries, truth, k, "dot_product", targets)
        peers: dict[str, Any] = {}
        for peer in PEERS:
            if peer.name not in available:
                peers[peer.name] = {"skipped": "not installed (pip install -e '.[bench]')"}
            elif n_items > params["peer_max_items"][peer.name]:
                peers[peer.name] = {
                    "skipped": f"build too slow above {params['peer_max_items'][peer.name]} items"
                }
            else:
                peers[peer.name] = run_peer(peer, items, queries, truth, k, targets)
            print(
                f"  {n_items:>9} items: {peer.name} {peers[peer.name].get('matched', peers[peer.name])}",
                flush=True,
            )
        first = str(targets[0])
        entry["peers"] = {
            name: {
                "build_s": peer["build_s"],
                **peer["matched"].get(first, {"recall_at_10": None, "p99_ms": None}),
            }
            if "build_s" in peer
            else peer
            for name, peer in peers.items()
        }
        entry["matched"] = {
            str(target): {
                "scann": entry["scann_matched"][str(target)]["p99_ms"],
                **{
                    name: peer["matched"][str(target)]["p99_ms"]
                    for name, peer in peers.items()
                    if str(target) in peer.get("matched", {})
                },
            }
            for target in targets
        }
        at_first = entry["matched"][first]
        best_peer = min((p99 for name, p99 in at_first.items() if name != "scann"), default=None)
        entry["scann_vs_best_peer"] = best_peer / at_first["scann"] if best_peer else None
        entry["peer_curves"] = {name: peer["curve"] for name, peer in peers.items() if "curve" in peer}
        if n_items <= params["cosine_max_items"]:
            cosine = index_vectors(items, IndexConfig(metric="cosine"))
            cosine_truth = exact_top_k(queries, cosine, k)
            del cosine
            gc.collect()
            scann_cosine = run_scann(items, queries, cosine_truth, k, "cosine", targets[:1])
            entry["cosine"] = {
                key: scann_cosine[key] for key in ("recall_at_10", "qps", "p50_ms", "p99_ms", "build_s")
            }
        results[str(n_items)] = entry
        print(
            f"  {n_items:>9} items: "
            + ", ".join(
                f"{key}={value}" for key, value in entry.items() if not isinstance(value, (dict, list))
            ),
            flush=True,
        )
        del items, queries, truth
        gc.collect()
    plot(results, plot_path)
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Recall@10 against one-query p99 for each library's grid, one panel per catalogue size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per library in every panel.
    colours = dict(zip(("scann", "hnswlib", "faiss_hnsw", "faiss_ivfpq"), plt.cm.tab10.colors, strict=False))
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (size, entry) in zip(axes[0], results.items(), strict=True):
        for name, curve in {"scann": entry.get("curve", []), **entry["peer_curves"]}.items():
            if curve:
                # Every measured setting, and the frontier: the best recall reached at each latency.
                points = sorted((p["p99_ms"], p["recall"]) for p in curve)
                frontier = [points[0]]
                for point in points[1:]:
                    if point[1] > frontier[-1][1]:
                        frontier.append(point)
                axis.plot(*zip(*frontier, strict=True), label=name, color=colours[name])
                axis.scatter(*zip(*points, strict=True), color=colours[name], s=12, alpha=0.5)
        axis.axhline(0.95, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set(
            title=f"{int(size):,} items, 64-d, inner product",
            xlabel="p99 ms (one query, one thread)",
            ylabel="recall@10",
        )
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
