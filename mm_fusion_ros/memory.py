"""Keep freed heap memory in the process, as real-time ROS 2 programs do.

Every camera frame allocates buffers of about 900 KiB (the colour-converted
frame, the serialized message, the bytes rclpy hands over). glibc serves
blocks that large with a fresh ``mmap`` and trims freed memory back to the OS,
so each frame first touches new pages and pays a page fault per 4 KiB. On the
development machine that cost about 0.9 ms per frame (building one serialized
640x480 Image: 0.99 ms with glibc's defaults, 0.05 ms with the settings below),
on the capture -> receipt path of every frame and on every camera message a
bag replay reads.

The cure is the one real-time guides for ROS 2 give (and ros2_control's
realtime tools apply): raise the mmap threshold so large blocks come from the
heap, and never trim the heap, so freed blocks are reused and stay mapped.
The price is that the process keeps its peak heap, here tens of MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20     # glibc's upper bound for this setting on 64-bit (HEAP_MAX / 2)
TRIM_THRESHOLD_BYTES = 1 << 30      # effectively never give freed heap back while running

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; False where the C library is not glibc (nothing changes)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
