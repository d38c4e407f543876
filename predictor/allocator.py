"""Keep freed memory in the process, so each forward pass reuses the last one's pages.

A forward pass allocates and frees the same activation buffers (megabytes each for one clip)
hundreds of times. By default glibc's malloc serves large blocks with fresh mmaps and hands the
freed top of the heap back to the kernel, so the next pass page-faults on every 4 KiB of those
buffers again: tens of thousands of faults per pass, a measurable share of each pass on 2 cores
(docs/performance.md). Raising both thresholds (the two are needed together: either alone changed
little or made it worse) keeps the pages. The model runs on a thread of its own, and glibc gives
such threads arenas of heaps that it unmaps as soon as they empty, whatever the
thresholds; so all threads share the main arena (the others allocate little, so its lock costs
next to nothing). With the three settings the faults go to zero. The cost: the resident set
stays at the largest request's peak instead of shrinking between requests.

jemalloc or tcmalloc through LD_PRELOAD would do the same but need a system package, and
GLIBC_TUNABLES would too but only where the environment is set (the image, not `make run` or a
plain `python -m predictor`); `mallopt` works however the server is started.
"""

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30
MMAP_THRESHOLD_MAX = 32 << 20  # older glibc refuses more; still above one clip's largest buffer


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep up to `KEEP_BYTES` freed, in one arena. Call it before the
    model's thread starts. False where there is no glibc (musl, macOS): the allocator stays as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mmap_threshold = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    kept = bool(mmap_threshold) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_ARENA_MAX, 1))
    logger.info("Freed memory is %s", "kept for reuse (glibc mallopt)" if kept else "returned to the system")
    return kept


def release_freed_memory() -> None:
    """Hand what is free now back to the system, once, after loading: loading peaks above what
    serving needs (the torch model is dropped once ONNX Runtime has its own copy), and
    `keep_freed_memory` would otherwise keep that peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
