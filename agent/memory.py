"""glibc malloc settings for a unit whose large buffers come and go (camera frames, model activations).

glibc serves a request of at least `M_MMAP_THRESHOLD` bytes (128 KiB at start) with its own mmap and returns
it to the kernel on free. But the threshold is dynamic: freeing such a block raises it to the block's size
(up to 32 MiB), so from the first freed 1 MB camera frame or 5 MB activation on, buffers of that size are cut
from the heap and per-thread arenas and stay resident after they are freed, each thread's arena keeping its
own. Fixing the threshold (mallopt) turns the dynamic adjustment off: every block above it is mapped and
unmapped again, and the trim threshold stays where it is set. Measured on the handheld (docs/handheld.md,
"Memory"): with onnxruntime's own arena off, this takes the running unit from ~165 to ~132 MB.

A no-op where the C library is not glibc (mallopt missing): the unit runs, with more memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_THRESHOLD = 256 * 1024  # a 640x480 BGR frame (900 kB) and every model activation are above it
TRIM_THRESHOLD = 1 << 20  # the heap's free top beyond this goes back to the kernel at free()

_applied: tuple[int, int] | None = None


def fixed_malloc_thresholds(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module doc). True when applied;
    False where mallopt is missing (not glibc). Idempotent; process-wide."""
    global _applied
    if _applied == (mmap_threshold, trim_threshold):
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc (no mallopt): malloc thresholds left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold)):
        log.warning("mallopt refused the thresholds %d/%d: left as they are", mmap_threshold, trim_threshold)
        return False
    _applied = (mmap_threshold, trim_threshold)
    return True
