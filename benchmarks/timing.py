"""The timing loop both sides of `peer_torch.py` use (standard library only: the torch worker imports it from its
own venv)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_calls(run: Callable[[], Any], reps: int, budget: float) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of up to `reps` calls of `run`, fewer once they add up to `budget`
    seconds (at least one): that is how the slowest rows keep a whole run within its time. CPU time counts all
    threads, which on a shared machine separates the work done from the waiting for a core."""
    times: list[float] = []
    cpu: list[float] = []
    while len(times) < reps and not (times and sum(times) >= budget):
        clock, cpu_clock = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - clock)
        cpu.append(time.process_time() - cpu_clock)
    return times, cpu
