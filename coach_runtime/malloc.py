"""Keep freed memory for reuse instead of handing it back to the kernel after every request.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mmap()s and trims
the heap top past 128 KiB of free memory; either way the next request's buffers (a 200 KB tensor
in a protobuf, its serialized copy, gRPC's buffers, a decoded array) are new pages, and every page
costs a fault. Measured here on a 200 KB request (1x50x32x32 float32): building the InferRequest
191 us -> 7.5 us, serializing it 165 us -> 3.8 us. So every `coach` process raises both limits at
start: allocations up to 32 MiB come from the heap and up to 256 MiB of free heap is kept; the
cost is that resident memory stays at its peak instead of shrinking between requests.

Off with COACH_MALLOC_TUNING=0; left alone where MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
are set (the operator's own tuning) and on C libraries without mallopt (musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if applied."""
    if os.environ.get("COACH_MALLOC_TUNING", "1") == "0":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; keeping the C library's defaults")
    return ok
