"""The interactions benchmark's memory sampler counts a process and its copies once."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# Samples in a process of its own (a test worker's children include the Spark JVM), which is counted
# with its children: one child holds 300 MB, then forks a copy that only sleeps and shares every page.
SAMPLE_A_CHILD_AND_ITS_COPY = """
import subprocess, sys, time
from benchmarks.interactions import PeakRss
HOLD_AND_FORK = '''
import os, time
held = bytearray(300 * 2**20)
for offset in range(0, len(held), 4096):
    held[offset] = 1
if os.fork() == 0:
    time.sleep(3); os._exit(0)
print("ready", flush=True)
time.sleep(3)
'''
import psutil
own = psutil.Process().memory_info().rss
with PeakRss(interval_s=0.05) as memory:
    child = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1)
    child.wait()
print(memory.peak - own)
"""


def test_a_childs_copy_sharing_its_memory_is_not_counted_twice() -> None:
    root = Path(__file__).resolve().parent.parent
    sampled = subprocess.run(
        [sys.executable, "-c", SAMPLE_A_CHILD_AND_ITS_COPY],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert 300 * 2**20 < int(sampled.stdout.split()[-1]) < 450 * 2**20
