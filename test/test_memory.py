"""keep_freed_memory: large freed blocks stay in the process, so the next frame buffer costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child process per setting: mallopt changes the whole process, and the test runner's must stay as it is.
_CHILD = r"""
import resource, sys, numpy as np
from mm_fusion_ros.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
for _ in range(5):   # warm up: the heap grows to its working size once
    a = frame.copy(); b = a.tobytes(); del a, b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):   # two ~900 KiB buffers alive at once per frame, as in camera_node
    a = frame.copy(); b = a.tobytes(); del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_frame_buffers_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # 200 frames x 2 buffers x ~225 pages each would fault ~90000 times if every buffer were fresh.
    assert kept < 2000, f"{kept} page faults for 200 frames with freed memory kept"
    assert default > 10 * max(kept, 1), f"glibc defaults: {default} faults, kept: {kept}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_applying_twice_gives_the_same_answer():
    out = subprocess.run([sys.executable, "-c",
                          "from mm_fusion_ros.memory import keep_freed_memory as k; print(k(), k())"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]
