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


MADV_DONTNEED = 4  # linux/mman.h
# Libraries whose loading runs much code never run again (registrations of operators, bindings, schemas):
# onnxruntime, OpenCV's Python module, cryptography's Rust module, pydantic-core. Measured on the handheld
# (docs/handheld.md, "Memory"): ~25 MB of their pages resident after start, ~8 MB of which come back.
STARTUP_HEAVY = ("onnxruntime_pybind11_state", "cv2.abi3", "cryptography/hazmat/bindings/_rust", "_pydantic_core")


def release_startup_code(library: str) -> int:
    """Unmap from this process the resident pages of `library`'s code and read-only data (its `r-xp` and
    `r--p` mappings whose path contains `library` and that hold no page this process wrote), so that only
    what is used from now on comes back. Returns the bytes released.

    For onnxruntime: loading the library and making a session runs the static initialisers of every
    operator, schema and kernel registration spread over its 27 MB of code, and the kernel's fault-around
    maps 64 kB around each: ~20 MB of its code end up resident, of which inference uses ~6 MB. The pages
    are clean copies of the file (read-only; a mapping with a private dirty page, such as the relocated
    RELRO part, is skipped), so
    dropping them loses nothing: they stay in the page cache, where the kernel may reclaim them, and a page
    needed again is mapped back from there. Only VmRSS's file part shrinks; the memory the unit writes
    (RssAnon) is not touched by this. Linux only; 0 elsewhere or if madvise is refused."""
    try:
        smaps = open("/proc/self/smaps").read().splitlines()  # noqa: SIM115 - read whole at once
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    released = 0
    mapping: tuple[int, int] | None = None
    fields: dict[str, int] = {}

    def flush() -> None:
        nonlocal released
        if mapping is not None and fields.get("Private_Dirty", 1) == 0 and fields.get("Anonymous", 1) == 0:
            start, end = mapping
            if madvise(start, end - start, MADV_DONTNEED) == 0:
                released += fields.get("Rss", 0) * 1024

    for line in smaps:
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            flush()
            mapping, fields = None, {}
            if len(parts) > 5 and parts[1] in ("r-xp", "r--p") and library in parts[5]:
                lo, hi = parts[0].split("-")
                mapping = (int(lo, 16), int(hi, 16))
        elif mapping is not None and len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    flush()
    if released:
        log.debug("released %.1f MB of %s code pages", released / 2**20, library)
    return released
