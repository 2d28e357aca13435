"""Keep freed memory in the process instead of returning it to the kernel.

Each training step allocates and frees the same large buffers (the logits and their gradient:
batch x bptt x vocabulary floats, hundreds of MB). glibc returns such blocks to the kernel on
free and page-faults them in again, zero-filled, on the next step; on CPU that costs 20-50% of
the step. Raising the mmap and trim thresholds (what MALLOC_MMAP_MAX_=0 and
MALLOC_TRIM_THRESHOLD_ do) lets the allocator reuse them. Has no effect off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; returns whether it applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        _done = False
    return _done
