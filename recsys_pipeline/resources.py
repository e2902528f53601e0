"""What a stage cost: wall seconds and peak resident memory of its process tree (Linux ``/proc``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def peak_rss_mb(pid: int | str = "self") -> float:
    """The peak resident memory (VmHWM) of one process, in MB; 0 where ``/proc`` does not tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree_peak_rss_mb() -> float:
    """This process's peak plus its JVM's when ``spark-submit`` started it (the JVM is the parent)."""
    parent = os.getppid()
    try:
        parent_is_jvm = Path(f"/proc/{parent}/comm").read_text().strip() == "java"
    except OSError:
        parent_is_jvm = False
    return peak_rss_mb() + (peak_rss_mb(parent) if parent_is_jvm else 0.0)


@contextmanager
def measured(task: str, record: dict[str, float]) -> Iterator[None]:
    """Fill ``record`` with ``stage_seconds_<task>`` and ``stage_peak_rss_mb_<task>`` when the block ends."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record[f"stage_seconds_{task}"] = time.perf_counter() - started
        record[f"stage_peak_rss_mb_{task}"] = process_tree_peak_rss_mb()
