"""Host memory: glibc's allocator keeps what XLA:CPU frees, so a step's buffers are not mapped and zeroed anew.

XLA:CPU allocates a program's temporaries with `malloc` at every execution and frees them after (the peer model's
train step: one 464 MiB block). glibc serves a block that large with a fresh `mmap` and unmaps it on `free`; from a
thread's own arena it falls back to `mmap` even with `mmap` switched off. So every step faults each page of it in
again and the kernel zeroes it: 119k minor faults and 0.24 s of system time per step, 12-15% of the step on one core
(`benchmarks/RESULTS.md`, "Page faults"). One arena, no `mmap` and no trimming keep the freed heap mapped, and the next
step reuses it: no faults, no system time. This is what PyTorch's CPU tuning guide gets from preloading jemalloc or
tcmalloc, done with glibc's own `mallopt`.

The price is that the process keeps its peak heap until it exits, which a training or serving process reaches on its
first step anyway. The settings must be made before JAX starts its CPU client (threads that have allocated keep their
own arenas), so `import dsv3c` makes them, before it loads JAX; `DSV3C_SYSTEM_MALLOC=1` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "DSV3C_SYSTEM_MALLOC"
"""Set (to anything but empty or 0) to keep glibc's allocator settings."""

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
"""One arena (every thread allocates from the main heap, which grows with brk), no mmap for large blocks, and never
give the top of the heap back (-1 disables trimming, mallopt(3))."""


def keep_freed_host_memory() -> bool:
    """Applies the settings when the process runs on glibc and the user has not opted out; True if they took."""
    if os.environ.get(OPT_OUT, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and other C libraries: their mallopt differs
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
