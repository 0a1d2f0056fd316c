"""Host memory: glibc's allocator keeps what XLA:CPU frees, so a step's buffers are not mapped and zeroed anew.

XLA:CPU allocates a program's temporaries with `malloc` at every execution and frees them after (the peer model's
train step: one 464 MiB block). glibc serves a block that large with a fresh `mmap` and unmaps it on `free`; from a
thread's own arena it falls back to `mmap` even with `mmap` switched off. So every step faults each page of it in
again and the kernel zeroes it: 119k minor faults and 0.24 s of system time per step, 12-15% of the step on one core
(`benchmarks/RESULTS.md`, "Page faults"). One arena, no `mmap` and no trimming keep the freed heap mapped, and the next
step reuses it: no faults, no system time. This is what PyTorch's CPU tuning guide gets from preloading jemalloc or
tcmalloc, done with glibc's own `mallopt`.

Without trimming, what XLA's compiler frees would stay in the heap, in pieces too small for the program's buffers,
which would then extend the heap past it (peak RSS of the peer model's compile and 3 train steps: 2,042 MiB against
1,768 with glibc's defaults). So after each XLA compile the heap's free pages are handed back (`malloc_trim`, on
JAX's compile event): the buffers then reuse that address range and fault it in once (1,291 MiB, and still no faults
in the steps). And a call's temporaries must be freed before the next call allocates its own, or the heap grows by
their size once more, which JAX's asynchronous CPU dispatch allowed (freeing on XLA's thread after the results are
ready): so XLA:CPU programs on one device run inline (`configure_jax`).

The allocator settings must be made before JAX starts its CPU client (threads that have allocated keep their own
arenas), so `import dsv3c` makes them, before it loads JAX; JAX's are made when `dsv3c.program` loads it, or at
`import dsv3c` if JAX is already loaded, in either case before a program runs. `DSV3C_SYSTEM_MALLOC=1` leaves both
as they are.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

OPT_OUT = "DSV3C_SYSTEM_MALLOC"
"""Set (to anything but empty or 0) to keep glibc's allocator settings."""

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
"""One arena (every thread allocates from the main heap, which grows with brk), no mmap for large blocks, and never
give the top of the heap back (-1 disables trimming, mallopt(3))."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and the user has not opted out."""
    if os.environ.get(OPT_OUT, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl and others: their mallopt differs


@functools.cache
def keep_freed_host_memory() -> bool:
    """Applies the settings (once); True if they took."""
    libc = _glibc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""What JAX records when XLA has compiled a program (`jax._src.dispatch.BACKEND_COMPILE_EVENT`)."""


@functools.cache
def configure_jax() -> None:
    """Where the settings took, once JAX is loaded (by the modules that import or run programs, before any runs):
    XLA:CPU programs on one device run inline, and the heap's free pages are handed back after every XLA compile.

    Inline, because with JAX's asynchronous CPU dispatch a step's temporaries are freed on XLA's thread after its
    results are ready, and the next step may allocate its own first: on a loaded host the heap then grew by a step's
    temporaries, twice in 40 steps of the peer model (1,393 -> 2,322 MiB; inline: 1,397 throughout)."""
    if not keep_freed_host_memory():
        return
    import jax
    import jax.monitoring

    jax.config.update("jax_cpu_enable_async_dispatch", False)  # read when JAX creates its CPU client
    libc = _glibc()

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(on_event)
