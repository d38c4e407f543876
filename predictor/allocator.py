"""Keep freed memory in the process, so each forward pass reuses the last one's pages.

A forward pass allocates and frees the same activation buffers (up to 15 MB each for one clip)
hundreds of times. By default glibc's malloc serves large blocks with fresh mmaps and hands the
freed top of the heap back to the kernel, so the next pass page-faults on every 4 KiB of those
buffers again: 75-130 k faults per pass, 12-16 % of an int8 pass and ~7 % of an fp32 one on
2 cores (measured). Raising both thresholds (the two are needed together: either alone changed
little or made it worse) keeps the pages. The model runs on a thread of its own, and glibc gives
such threads arenas of 64 MiB heaps that it unmaps as soon as they empty, whatever the
thresholds; so all threads share the main arena (the others allocate little, so its lock costs
nothing measurable). With the three settings the faults go to zero. The cost: the resident set
stays at the largest request's peak instead of shrinking between requests.

jemalloc or tcmalloc through LD_PRELOAD would do the same, but need a system package and an
environment the server cannot give itself; `mallopt` it can call at start-up.
"""

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep up to `KEEP_BYTES` freed, in one arena. Call it before the
    model's thread starts. False where there is no glibc (musl, macOS): the allocator stays as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES))
    kept = all([bool(mallopt(option, value)) for option, value in settings])
    logger.info("Freed memory is %s", "kept for reuse (glibc mallopt)" if kept else "returned to the system")
    return kept


def release_freed_memory() -> None:
    """Hand what is free now back to the system, once: loading (an ONNX export above all) peaks
    far above what serving needs, and `keep_freed_memory` would otherwise keep that peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
