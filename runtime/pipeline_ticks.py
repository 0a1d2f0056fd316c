"""A pipeline schedule as the static tables one SPMD program runs: what each rank does at each tick, which buffer
slot each value lives in, and where each sent activation or gradient lands.

The program is lock-step: at every tick each rank runs at most one unit (an action, or DualPipeV's overlapped forward
and backward pair), then the ranks exchange what they produced with `ppermute`. The ticks are the start times of the
schedule's simulated run (by default at unit costs: F = B = W = 1, a whole backward 2, a pair the sum of its parts;
any costs give valid tables): a unit starts
at a tick only after everything it needs ended at an earlier one, so running the units tick by tick keeps every
dependency, and the idle time the simulation measures is the idle time of the tables (`bubble`).

Activations and gradients wait in slots, not in per-micro-batch buffers: a slot is taken when a value arrives and
given back once its last reader has run (the backward, or the weights' backward of a split one), so a rank holds as
many as the schedule keeps alive at once (1F1B's P - r, GPipe's M). The chunk's saved residuals have slots of their
own, one pool per local chunk (their shapes differ between a rank's chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from .schedules import Action, Kind, Schedule, simulate


class Unit(IntEnum):
    """What a rank runs at a tick."""

    IDLE = 0
    F = 1
    B = 2  # the whole backward: the input's gradient and the weights'
    B_SPLIT = 3  # the input's gradient only (its W runs later)
    W = 4
    FB = 5  # an overlapped forward and whole backward
    FB_SPLIT = 6  # an overlapped forward and input-only backward


@dataclass
class _Pool:
    """Slots handed out lowest first and given back after the tick that last reads them."""

    free: list[int] = field(default_factory=list)
    size: int = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop(0)
        self.size += 1
        return self.size - 1

    def give(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort()


@dataclass(frozen=True)
class TickTables:
    """Per tick and rank (arrays [ticks, ranks]): the unit, the forward's local chunk (`f_chunk`, its index among
    the rank's chunks) and micro-batch, the backward's (`b_chunk`, `b_mb`, for B, W and pairs), the slots they use,
    and for each channel where what arrives at the end of the tick goes (`recv_act`, `recv_grad` [ticks, ranks,
    channels], -1 for nothing). Activation slot `act_slots` (per rank) is the trash slot receives of nothing go to."""

    schedule: Schedule
    times: tuple[float, ...]
    unit: np.ndarray
    f_chunk: np.ndarray
    f_mb: np.ndarray
    b_chunk: np.ndarray
    b_mb: np.ndarray
    f_act: np.ndarray  # slot the forward reads its input from (chunk 0: writes the embedding's output to)
    f_out: np.ndarray  # last chunk: slot the forward keeps its output in, for the loss
    f_res: np.ndarray  # residual slot the forward saves into (in its chunk's pool)
    b_act: np.ndarray  # slot of the backward's (or W's) input activation
    b_out: np.ndarray  # last chunk: slot of its kept output
    b_grad: np.ndarray  # slot of the gradient w.r.t. the chunk's output (last chunk: where B writes it, for its W)
    b_res: np.ndarray
    recv_act: np.ndarray
    recv_grad: np.ndarray
    act_slots: int
    grad_slots: int
    res_slots: tuple[int, ...]  # per local chunk
    act_channels: tuple[int, ...]  # rank offsets (mod ranks) activations travel: +1 down the pipe, ranks-1 up, 0 stay
    grad_channels: tuple[int, ...]
    busy: tuple[float, ...]  # per rank, time spent computing (at the costs the tables were built for)
    makespan: float

    @property
    def ticks(self) -> int:
        return len(self.times)

    @property
    def bubble(self) -> float:
        """The idle time, in time units, of the rank that waits longest (what `bubble_formula` gives)."""
        return self.makespan - min(self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle over all ranks' time."""
        ranks = self.schedule.ranks
        return (ranks * self.makespan - sum(self.busy)) / (ranks * self.makespan)

    def idle_ticks(self) -> int:
        """Ticks x ranks where a rank starts nothing (the unit of the program's loop)."""
        return int(np.sum(self.unit == Unit.IDLE))


def local_chunk(schedule: Schedule, chunk: int) -> int:
    """The chunk's index among its rank's chunks, in chunk order (DualPipeV: 0 on the way down, 1 back up)."""
    return schedule.chunks_of(schedule.placement[chunk]).index(chunk)


def build_tables(schedule: Schedule, F: float = 1, B: float = 1, W: float = 1, FB: float | None = None) -> TickTables:
    """The lock-step tables of `schedule` (module docstring), ordered by its simulated run at per-chunk costs F, B,
    W and FB (`simulate`'s; any costs give valid tables, these decide only which unit goes first)."""
    ranks, chunks = schedule.ranks, schedule.num_chunks
    timeline = simulate(schedule, F=F, B=B, W=W, FB=FB)
    starts = sorted({unit[0].start for r in range(ranks) for unit in timeline.units(r)})
    tick_of = {t: i for i, t in enumerate(starts)}
    ticks = len(starts)
    shape = (ticks, ranks)
    tables = {name: np.full(shape, -1, np.int32) for name in
              ("f_chunk", "f_mb", "b_chunk", "b_mb", "f_act", "f_out", "f_res", "b_act", "b_out", "b_grad", "b_res")}
    unit_kind = np.zeros(shape, np.int32)
    act_channels = sorted({(schedule.placement[c + 1] - schedule.placement[c]) % ranks for c in range(chunks - 1)})
    grad_channels = sorted({(-d) % ranks for d in act_channels})
    recv_act = np.full((ticks, ranks, len(act_channels)), -1, np.int32)
    recv_grad = np.full((ticks, ranks, len(grad_channels)), -1, np.int32)

    # Events in tick order; within a tick, reads happen before the end-of-tick receives and frees.
    units = {(r, tick_of[u[0].start]): tuple(s.action for s in u) for r in range(ranks) for u in timeline.units(r)}
    acts = [_Pool() for _ in range(ranks)]
    grads = [_Pool() for _ in range(ranks)]
    per_rank = len(schedule.chunks_of(0))
    res = [[_Pool() for _ in range(per_rank)] for _ in range(ranks)]
    act_slot: dict[tuple[int, int], int] = {}  # (chunk, mb) -> slot of the chunk's input; chunk == chunks: last output
    grad_slot: dict[tuple[int, int], int] = {}  # (chunk, mb) -> slot of the gradient w.r.t. the chunk's output
    res_slot: dict[tuple[int, int], int] = {}
    for t in range(ticks):
        freed: list[tuple[_Pool, int]] = []
        arrivals: list[tuple[int, str, int, int, int]] = []  # (rank, kind, channel, chunk, mb)
        for r in range(ranks):
            actions = units.get((r, t))
            if actions is None:
                continue
            forward = next((a for a in actions if a.kind == Kind.F), None)
            backward = next((a for a in actions if a.kind != Kind.F), None)
            unit_kind[t, r] = _unit(schedule, forward, backward)
            if forward is not None:
                c, m = forward.stage, forward.microbatch
                tables["f_chunk"][t, r], tables["f_mb"][t, r] = local_chunk(schedule, c), m
                if c == 0:
                    act_slot[(0, m)] = acts[r].take()
                tables["f_act"][t, r] = act_slot[(c, m)]
                slot = res[r][local_chunk(schedule, c)].take()
                res_slot[(c, m)] = tables["f_res"][t, r] = slot
                if c == chunks - 1:
                    act_slot[(chunks, m)] = tables["f_out"][t, r] = acts[r].take()
                else:
                    dst = schedule.placement[c + 1]
                    arrivals.append((dst, "act", act_channels.index((dst - r) % ranks), c + 1, m))
            if backward is not None:
                c, m = backward.stage, backward.microbatch
                tables["b_chunk"][t, r], tables["b_mb"][t, r] = local_chunk(schedule, c), m
                tables["b_act"][t, r], tables["b_res"][t, r] = act_slot[(c, m)], res_slot[(c, m)]
                if c == chunks - 1:
                    tables["b_out"][t, r] = act_slot[(chunks, m)]
                    if backward.kind == Kind.B:
                        grad_slot[(c, m)] = grads[r].take()
                tables["b_grad"][t, r] = grad_slot[(c, m)]
                if backward.kind == Kind.B and c > 0:
                    dst = schedule.placement[c - 1]
                    arrivals.append((dst, "grad", grad_channels.index((dst - r) % ranks), c - 1, m))
                last_reader = backward.kind == Kind.W or not schedule.is_split(backward)
                if last_reader:
                    freed += [(acts[r], act_slot[(c, m)]), (grads[r], grad_slot[(c, m)]),
                              (res[r][local_chunk(schedule, c)], res_slot[(c, m)])]
                    if c == chunks - 1:
                        freed.append((acts[r], act_slot[(chunks, m)]))
        for pool, slot in freed:
            pool.give(slot)
        for dst, kind, channel, c, m in arrivals:
            if kind == "act":
                act_slot[(c, m)] = recv_act[t, dst, channel] = acts[dst].take()
            else:
                grad_slot[(c, m)] = recv_grad[t, dst, channel] = grads[dst].take()
    act_slots = max(p.size for p in acts)
    grad_slots = max(p.size for p in grads)
    recv_act[recv_act < 0] = act_slots  # the trash slot
    recv_grad[recv_grad < 0] = grad_slots
    return TickTables(
        schedule=schedule, times=tuple(starts), unit=unit_kind, **tables, recv_act=recv_act, recv_grad=recv_grad,
        act_slots=act_slots, grad_slots=grad_slots,
        res_slots=tuple(max(res[r][v].size for r in range(ranks)) for v in range(per_rank)),
        act_channels=tuple(act_channels), grad_channels=tuple(grad_channels),
        busy=tuple(timeline.busy(r) for r in range(ranks)), makespan=timeline.makespan,
    )


def _unit(schedule: Schedule, forward: Action | None, backward: Action | None) -> Unit:
    if backward is None:
        return Unit.F
    if backward.kind == Kind.W:
        return Unit.W
    split = schedule.is_split(backward)
    if forward is None:
        return Unit.B_SPLIT if split else Unit.B
    return Unit.FB_SPLIT if split else Unit.FB
