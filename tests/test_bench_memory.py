"""The interactions benchmark's memory sampler counts a process and its copies once."""

import subprocess
import sys
import time

import pytest

from benchmarks.interactions import PeakRss

pytestmark = pytest.mark.unit

# Holds 300 MB, then forks a copy that only sleeps: the copy shares every page until it writes one.
HOLD_AND_FORK = """
import os, sys, time
held = bytearray(300 * 2**20)
for offset in range(0, len(held), 4096):
    held[offset] = 1
if os.fork() == 0:
    time.sleep(3); os._exit(0)
print("ready", flush=True)
time.sleep(3)
"""


def test_a_childs_copy_sharing_its_memory_is_not_counted_twice() -> None:
    with PeakRss(interval_s=0.05) as memory:
        child = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(1)
        child.wait()
    assert 300 * 2**20 < memory.peak < 450 * 2**20
