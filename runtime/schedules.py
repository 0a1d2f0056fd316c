"""Static pipeline-parallel schedules as data, and an event simulation that measures their bubbles.

A pipeline-parallel train step cuts the layers into `num_chunks` model chunks placed on `ranks` devices and runs
`microbatches` micro-batches through them. A schedule fixes, for each rank, the order of its actions: `F` (a
micro-batch's forward through one chunk), `B` (its backward: for the chunk's input only where the schedule splits
the backward, the whole backward where it does not) and `W` (the weights' part of a split backward, which nothing
downstream waits for and can therefore fill idle time). The lowering runs these orders one action at a time; the
simulator here runs them against a cost model to say how long each rank sits idle, before anything is compiled.

The schedules: GPipe, 1F1B, Megatron's interleaved 1F1B, ZB-H1 (the zero-bubble paper's 1F1B with split backward)
and DeepSeek's DualPipeV, whose paired forward and backward actions run overlapped (one hides the other's
all-to-all): `Schedule.overlapped` names those pairs.

Durations are per action, i.e. per chunk: F, B (input backward) and W (weight backward); an unsplit backward
takes B + W and an overlapped pair takes FB (the sum of its two actions unless given). Any numbers that add and
compare will do, so Fractions give exact timelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path


class Kind(StrEnum):
    """What an action computes: the forward, the (input) backward, or the weights' backward."""

    F = "F"
    B = "B"
    W = "W"


@dataclass(frozen=True, order=True)
class Action:
    """One chunk's forward, backward or weight-gradient computation for one micro-batch."""

    kind: Kind
    microbatch: int
    stage: int  # the model chunk, 0..num_chunks-1 (not the rank it runs on)

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage}"


@dataclass(frozen=True)
class Schedule:
    """Which rank holds each chunk and the order in which each rank runs its actions.

    A backward is split when the schedule also has a W for its (chunk, micro-batch): its B then computes only the
    input's gradient, which the previous chunk waits for, and the W computes the weights' gradient whenever the
    rank has nothing better to do. Otherwise the B is the whole backward and sends its gradient only at its end.
    ZB splits every backward, DualPipeV some, the others none.

    `overlapped` holds (forward, backward) pairs that run as one unit (DualPipeV's F&B): the backward follows the
    forward directly in the rank's program, the unit starts once both inputs have arrived, and both outputs leave
    at its end.
    """

    name: str
    ranks: int
    microbatches: int
    num_chunks: int
    placement: tuple[int, ...]  # chunk -> rank
    programs: tuple[tuple[Action, ...], ...]  # rank -> its actions, in order
    overlapped: frozenset[tuple[Action, Action]] = frozenset()

    def __post_init__(self) -> None:
        if len(self.placement) != self.num_chunks or len(self.programs) != self.ranks:
            raise ValueError(f"{self.name}: placement/programs do not fit {self.num_chunks} chunks, {self.ranks} ranks")
        actions = sorted(a for program in self.programs for a in program)
        chunks, microbatches = range(self.num_chunks), range(self.microbatches)
        expected = sorted(
            [Action(k, m, c) for k in (Kind.F, Kind.B) for m in microbatches for c in chunks]
            + [a for a in actions if a.kind == Kind.W]
        )
        if actions != expected or len(set(actions)) != len(actions):
            raise ValueError(f"{self.name}: every (chunk, micro-batch) needs one F, one B and at most one W")
        for rank, program in enumerate(self.programs):
            for a in program:
                if self.placement[a.stage] != rank:
                    where = self.placement[a.stage]
                    raise ValueError(f"{self.name}: rank {rank} runs {a} but chunk {a.stage} is on rank {where}")
        for f, b in self.overlapped:
            program = self.programs[self.placement[f.stage]]
            i = program.index(f) if f in program else -2
            if f.kind != Kind.F or b.kind != Kind.B or program[i + 1 : i + 2] != (b,):
                raise ValueError(f"{self.name}: overlapped pair ({f}, {b}) is not a forward directly before a backward")

    @cached_property
    def weight_actions(self) -> frozenset[Action]:
        """The W actions: one for each split backward."""
        return frozenset(a for program in self.programs for a in program if a.kind == Kind.W)

    def is_split(self, backward: Action) -> bool:
        """Whether this B computes only the input's gradient (its W is a separate action)."""
        return Action(Kind.W, backward.microbatch, backward.stage) in self.weight_actions

    @property
    def split_backward(self) -> bool:
        """Whether every backward is split into B and W."""
        return len(self.weight_actions) == self.num_chunks * self.microbatches

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The chunks `rank` holds, in chunk order."""
        return tuple(c for c, r in enumerate(self.placement) if r == rank)

    def units(self, rank: int) -> Iterator[tuple[Action, ...]]:
        """The rank's program as what starts together: one action, or an overlapped (forward, backward) pair."""
        program, i = self.programs[rank], 0
        while i < len(program):
            n = 2 if program[i : i + 2] in self.overlapped else 1
            yield program[i : i + n]
            i += n


def dependencies(schedule: Schedule, action: Action) -> tuple[Action, ...]:
    """What must finish before `action` can start: the previous chunk's forward, the next chunk's backward (the loss,
    i.e. its own forward, for the last chunk), and its own backward for a weight gradient."""
    c, m = action.stage, action.microbatch
    if action.kind == Kind.F:
        return (Action(Kind.F, m, c - 1),) if c > 0 else ()
    if action.kind == Kind.B:
        return (Action(Kind.B, m, c + 1),) if c < schedule.num_chunks - 1 else (Action(Kind.F, m, c),)
    return (Action(Kind.B, m, c),)


# --- the schedules ---------------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _gpipe(ranks: int, microbatches: int, virtual: int) -> Schedule:
    """Every forward, then every backward, each in micro-batch order: M activations held at once."""
    programs = tuple(
        tuple(Action(k, m, r) for k in (Kind.F, Kind.B) for m in range(microbatches)) for r in range(ranks)
    )
    return Schedule("gpipe", ranks, microbatches, ranks, tuple(range(ranks)), programs)


def _one_f_one_b_order(rank: int, ranks: int, microbatches: int) -> list[tuple[Kind, int]]:
    """1F1B's order on `rank`: ranks-1-rank warm-up forwards, then alternate forward and backward, then the rest of
    the backwards. A micro-batch's backward starts as soon as it can, so at most ranks-rank are held."""
    warmup = ranks - 1 - rank
    order = [(Kind.F, m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        order += [(Kind.F, warmup + m), (Kind.B, m)]
    return order + [(Kind.B, m) for m in range(microbatches - warmup, microbatches)]


def _1f1b(ranks: int, microbatches: int, virtual: int) -> Schedule:
    _check(microbatches >= ranks, f"1f1b needs at least as many micro-batches as ranks ({microbatches} < {ranks})")
    programs = tuple(
        tuple(Action(k, m, r) for k, m in _one_f_one_b_order(r, ranks, microbatches)) for r in range(ranks)
    )
    return Schedule("1f1b", ranks, microbatches, ranks, tuple(range(ranks)), programs)


def _zb(ranks: int, microbatches: int, virtual: int) -> Schedule:
    """ZB-H1 (Qi et al., arXiv 2401.10241; the order of sail-sg's ZeroBubbleH1Pipeline with exact semantics): 1F1B's
    order of F and B, but rank r holds back its first r weight gradients: from its (r+1)-th backward on, each B is
    followed by the W of the oldest backward still waiting for one, and the r held back run at the very end, where
    1F1B would wait for gradients coming back down the pipeline. B travels back without waiting for any W."""
    _check(microbatches >= ranks, f"zb needs at least as many micro-batches as ranks ({microbatches} < {ranks})")
    programs = []
    for r in range(ranks):
        program: list[Action] = []
        backwards = 0
        for kind, m in _one_f_one_b_order(r, ranks, microbatches):
            program.append(Action(kind, m, r))
            if kind == Kind.B:
                backwards += 1
                if backwards > r:
                    program.append(Action(Kind.W, backwards - 1 - r, r))
        program += [Action(Kind.W, m, r) for m in range(microbatches - r, microbatches)]
        programs.append(tuple(program))
    return Schedule("zb", ranks, microbatches, ranks, tuple(range(ranks)), tuple(programs))


def _interleaved(ranks: int, microbatches: int, virtual: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B: rank r holds chunks r, r+P, ..., and runs micro-batches in groups of P
    through one local chunk after another (forwards from its first chunk, backwards from its last). The warm-up is
    (P-r-1)*2 + (v-1)*P forwards; with M == P everything is warm-up, as in Megatron."""
    _check(virtual >= 2, f"interleaved needs at least 2 chunks per rank (virtual={virtual}); use 1f1b for one")
    _check(
        microbatches >= ranks and microbatches % ranks == 0,
        f"interleaved needs the micro-batches to be a multiple of the ranks ({microbatches} over {ranks})",
    )
    total = virtual * microbatches

    def action(kind: Kind, k: int, rank: int) -> Action:
        group, within = divmod(k, ranks * virtual)
        local = within // ranks
        if kind == Kind.B:
            local = virtual - 1 - local
        return Action(kind, group * ranks + within % ranks, local * ranks + rank)

    programs = []
    for r in range(ranks):
        warmup = total if microbatches == ranks else min(total, (ranks - r - 1) * 2 + (virtual - 1) * ranks)
        program = [action(Kind.F, k, r) for k in range(warmup)]
        for k in range(total - warmup):
            program += [action(Kind.F, warmup + k, r), action(Kind.B, k, r)]
        program += [action(Kind.B, k, r) for k in range(total - warmup, total)]
        programs.append(tuple(program))
    placement = tuple(c % ranks for c in range(virtual * ranks))
    return Schedule("interleaved", ranks, microbatches, virtual * ranks, placement, tuple(programs))


class _VRank:
    """One DualPipeV rank's program as DeepSeek's code runs it: a forward and a backward counter per phase (phase 0
    is the rank's chunk on the way down the V, phase 1 its chunk on the way back) and a first-in first-out queue of
    the weight gradients its split backwards held back."""

    def __init__(self, ranks: int, rank: int):
        self.chunk = (rank, 2 * ranks - 1 - rank)
        self.forwards, self.backwards = [0, 0], [0, 0]
        self.held: list[Action] = []
        self.program: list[Action] = []
        self.overlapped: set[tuple[Action, Action]] = set()

    def forward(self, phase: int) -> Action:
        self.forwards[phase] += 1
        action = Action(Kind.F, self.forwards[phase] - 1, self.chunk[phase])
        self.program.append(action)
        return action

    def backward(self, phase: int, split: bool = False) -> Action:
        self.backwards[phase] += 1
        action = Action(Kind.B, self.backwards[phase] - 1, self.chunk[phase])
        self.program.append(action)
        if split:
            self.held.append(Action(Kind.W, action.microbatch, action.stage))
        return action

    def pair(self, f_phase: int, b_phase: int) -> None:
        self.overlapped.add((self.forward(f_phase), self.backward(b_phase)))

    def weight(self) -> None:
        self.program.append(self.held.pop(0))


def _dualpipev(ranks: int, microbatches: int, virtual: int) -> Schedule:
    """DeepSeek's DualPipeV (github.com/deepseek-ai/DualPipe, dualpipe/dualpipev.py): 2P chunks folded into a V, rank
    r holding chunk r (phase 0) and chunk 2P-1-r (phase 1), so rank 0 holds the first and the last. Its eight steps,
    per rank:
      1. 2(P-r-1) forwards of phase 0          5. P-r-1 times: B1, then the pair F1&B0
      2. r+1 times: F0, F1                      6. r+1 times: B1, B0 (split from the middle on)
      3. P-r-1 times: B1 (split), its W, F1     7. P-r-1 times: a held-back W, then B0 (split)
      4. M-2P+r+1 times: F0&B1, F1&B0           8. the r+1 held-back Ws
    where the first step-4 pair on the last rank runs unpaired. Only the backwards DeepSeek runs with `enable_zb` are
    split; the others, those in pairs included, are whole. Needs M >= 2P, as DeepSeek asserts."""
    _check(
        microbatches >= 2 * ranks,
        f"dualpipev needs at least twice as many micro-batches as ranks ({microbatches} < {2 * ranks})",
    )
    writers = [_VRank(ranks, r) for r in range(ranks)]
    for r, v in enumerate(writers):
        for _ in range(2 * (ranks - r - 1)):
            v.forward(0)
        for _ in range(r + 1):
            v.forward(0)
            v.forward(1)
        for _ in range(ranks - r - 1):
            v.backward(1, split=True)
            v.weight()
            v.forward(1)
        for i in range(microbatches - 2 * ranks + r + 1):
            if i == 0 and r == ranks - 1:  # DeepSeek: not overlapped, to shrink the bubble
                v.forward(0)
                v.backward(1)
            else:
                v.pair(0, 1)
            v.pair(1, 0)
        for _ in range(ranks - r - 1):
            v.backward(1)
            v.pair(1, 0)
        middle = (r + 1) // 2
        for i in range(r + 1):
            v.backward(1, split=i > middle or (i == middle and r % 2 == 1))
            v.backward(0, split=i >= middle)
        for _ in range(ranks - r - 1):
            v.weight()
            v.backward(0, split=True)
        while v.held:
            v.weight()
    placement = tuple(c if c < ranks else 2 * ranks - 1 - c for c in range(2 * ranks))
    programs = tuple(tuple(v.program) for v in writers)
    overlapped = frozenset(pair for v in writers for pair in v.overlapped)
    return Schedule("dualpipev", ranks, microbatches, 2 * ranks, placement, programs, overlapped)


BUILDERS: dict[str, Callable[[int, int, int], Schedule]] = {
    "gpipe": _gpipe,
    "1f1b": _1f1b,
    "interleaved": _interleaved,
    "zb": _zb,
    "dualpipev": _dualpipev,
}


def build_schedule(name: str, ranks: int, microbatches: int, virtual: int = 2) -> Schedule:
    """The schedule `name` (one of BUILDERS) for `ranks` devices and `microbatches` micro-batches; `virtual` is the
    chunks per rank of the interleaved schedule (the others fix it: one, or two for DualPipeV)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(BUILDERS)}")
    _check(ranks >= 1 and microbatches >= 1, f"{name} needs at least one rank and one micro-batch")
    return BUILDERS[name](ranks, microbatches, virtual)


# --- the simulation --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """When one action ran on its rank (the two actions of an overlapped pair share one span)."""

    start: float
    end: float
    action: Action


@dataclass(frozen=True)
class Timeline:
    """A schedule's simulated run: per rank, its actions' spans in program order."""

    schedule: Schedule
    spans: tuple[tuple[Span, ...], ...]

    @property
    def makespan(self) -> float:
        """From the first action's start (time 0) to the last action's end, on any rank."""
        return max(s.end for spans in self.spans for s in spans)

    def busy(self, rank: int) -> float:
        """Time `rank` spends computing (an overlapped pair counts once)."""
        return sum(unit[0].end - unit[0].start for unit in self.units(rank))

    def idle(self, rank: int) -> float:
        """Time `rank` waits within the makespan: before its first action, between actions and after its last."""
        return self.makespan - self.busy(rank)

    @property
    def bubble(self) -> float:
        """The idle time of the rank that waits longest: what DeepSeek's bubble table counts (`bubble_formula`).
        Ranks doing equal work idle equally; with overlapped pairs faster than their parts, the ranks running the
        most pairs finish their work soonest and wait longest."""
        return max(self.idle(r) for r in range(self.schedule.ranks))

    @property
    def bubble_fraction(self) -> float:
        """The share of all ranks' time spent waiting: total idle over ranks x makespan."""
        return sum(self.idle(r) for r in range(self.schedule.ranks)) / (self.schedule.ranks * self.makespan)

    def peak_activations(self, rank: int) -> int:
        """The most micro-batch activations `rank` holds at once: (chunk, micro-batch) pairs whose forward has
        finished and whose backward has not. A chunk of an interleaved or V schedule is a fraction of a 1F1B
        stage, so compare across schedules in units of layers, not of this count. (ZB also keeps what W needs until
        W runs; that is not counted here.)"""
        events = sorted(
            (s.end, -1 if s.action.kind == Kind.B else 1) for s in self.spans[rank] if s.action.kind != Kind.W
        )
        held = peak = 0
        for _, delta in events:  # at equal times a backward frees its activation before a forward adds one
            held += delta
            peak = max(peak, held)
        return peak

    def units(self, rank: int) -> Iterator[tuple[Span, ...]]:
        """The rank's spans grouped as they ran: one action, or an overlapped pair sharing one span."""
        spans, i = self.spans[rank], 0
        while i < len(spans):
            n = 2 if tuple(s.action for s in spans[i : i + 2]) in self.schedule.overlapped else 1
            yield spans[i : i + n]
            i += n


def simulate(schedule: Schedule, F: float = 1.0, B: float = 1.0, W: float = 1.0, FB: float | None = None) -> Timeline:
    """Runs every rank's program in order, each unit starting as soon as its rank is free and its dependencies have
    finished (communication is free). F, B and W are one chunk's forward, input backward and weight backward, so a
    whole (unsplit) backward takes B + W; an overlapped pair takes FB, DeepSeek's F&B, by default the sum of its
    two actions (no gain from overlapping). Raises ValueError on a deadlock (some rank's next unit waits on an
    action that can never run)."""

    def cost(action: Action) -> float:
        if action.kind == Kind.B:
            return B if schedule.is_split(action) else B + W
        return F if action.kind == Kind.F else W

    units = [list(schedule.units(r)) for r in range(schedule.ranks)]
    done: dict[Action, float] = {}
    free: list[float] = [0] * schedule.ranks  # an int zero keeps Fraction durations exact
    at = [0] * schedule.ranks
    spans: list[list[Span]] = [[] for _ in range(schedule.ranks)]
    while any(at[r] < len(units[r]) for r in range(schedule.ranks)):
        progressed = False
        for r in range(schedule.ranks):
            while at[r] < len(units[r]):
                unit = units[r][at[r]]
                needs = [d for a in unit for d in dependencies(schedule, a)]
                if any(d not in done for d in needs):
                    break
                start = max([free[r], *(done[d] for d in needs)])
                free[r] = start + (FB if len(unit) == 2 and FB is not None else sum(cost(a) for a in unit))
                for a in unit:
                    done[a] = free[r]
                    spans[r].append(Span(start, free[r], a))
                at[r] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"rank {r} at {' & '.join(map(str, units[r][at[r]]))}" for r in range(schedule.ranks)
                              if at[r] < len(units[r]))
            raise ValueError(f"{schedule.name}: deadlock, every rank waits: {stuck}")
    return Timeline(schedule, tuple(tuple(s) for s in spans))


# --- the closed forms ------------------------------------------------------------------------------------------------


FORMULAS: dict[str, Callable[[int, float, float, float, float], float]] = {
    "gpipe": lambda p, f, b, w, fb: (p - 1) * (f + b + w),
    "1f1b": lambda p, f, b, w, fb: (p - 1) * (f + b + w),
    "interleaved": lambda p, f, b, w, fb: (p - 1) * (f + b + w),
    "zb": lambda p, f, b, w, fb: (p - 1) * (f + b - w),
    "dualpipev": lambda p, f, b, w, fb: (p - 1) * (fb + b - 2 * w),
}


def bubble_formula(
    name: str, ranks: int, F: float = 1.0, B: float = 1.0, W: float = 1.0, FB: float | None = None
) -> float:
    """The published bubble of schedule `name` on `ranks` devices, in `simulate`'s units: F, B, W per action (per
    chunk), B the input's backward alone, so a whole backward is B + W, and FB an overlapped pair (default F+B+W).

    It is `Timeline.bubble`, the idle time of the rank that waits longest, counted from time 0 to the makespan
    (warm-up, gaps and tail; communication is free), which does not depend on the number of micro-batches:
      gpipe, 1f1b   (P-1)(F+B+W)  the usual (P-1)(F+B) with B whole
      interleaved   (P-1)(F+B+W)  per chunk: Megatron's (P-1)(F+B)/v in times of whole stages (v chunks each)
      zb            (P-1)(F+B-W)  DeepSeek's ZB1P row (PP-1)(F+B-2W), whose B is whole (B+W here)
      dualpipev     (P-1)(FB+B-2W)  DeepSeek's (PP/2-1)(F&B+B-3W), B whole again, with PP = 2P: its PP counts
                                  chunks (stages), and DualPipeV runs them on PP/2 devices
    The first three hold for any durations. ZB-H1's needs W <= min(F, B) (beyond it a rank waits (P-1)max(F, B)).
    DualPipeV's needs F == B and W <= F, as in DeepSeek's picture, and then holds for any FB from max(F, B+W) to
    F+B+W; with F != B the simulated bubble differs (F=1, B=2, W=1, P=4: 11, not 12; F=2, B=1, W=0.5: 13.5, not
    10.5)."""
    if name not in FORMULAS:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(FORMULAS)}")
    return FORMULAS[name](ranks, F, B, W, F + B + W if FB is None else FB)


# --- pictures --------------------------------------------------------------------------------------------------------


def _label(schedule: Schedule, action: Action) -> str:
    """`F3`, `b3`, `w3` for micro-batch 3; on a rank holding several chunks, `.k` says which (its k-th, in chunk
    order: on DualPipeV `.0` is the way down the V and `.1` the way back)."""
    text = f"{'F' if action.kind == Kind.F else action.kind.lower()}{action.microbatch}"
    local = schedule.chunks_of(schedule.placement[action.stage])
    return text if len(local) == 1 else f"{text}.{local.index(action.stage)}"


def _segments(timeline: Timeline, rank: int) -> Iterator[tuple[float, float, Action]]:
    """What to draw: (start, end, action); an overlapped pair is drawn as its forward in the first half of the span
    they share and its backward in the second, as in DeepSeek's pictures."""
    for unit in timeline.units(rank):
        start, end = unit[0].start, unit[0].end
        if len(unit) == 1:
            yield start, end, unit[0].action
        else:
            middle = (start + end) / 2
            yield start, middle, unit[0].action
            yield middle, end, unit[1].action


def render_table(timeline: Timeline, resolution: float = 1.0) -> str:
    """The timeline as text: a row per rank, a column per `resolution` time units, each cell naming the action
    running at the column's middle (`.` when idle; see `_label`)."""
    schedule = timeline.schedule
    columns = math.ceil(timeline.makespan / resolution - 1e-9)
    rows = []
    for rank in range(schedule.ranks):
        segments = list(_segments(timeline, rank))
        cells = []
        for col in range(columns):
            t = (col + 0.5) * resolution
            hit = [a for start, end, a in segments if start <= t < end]
            cells.append(_label(schedule, hit[0]) if hit else ".")
        rows.append(cells)
    width = max(len(c) for cells in rows for c in cells)
    return "\n".join(f"{r} " + " ".join(c.ljust(width) for c in cells).rstrip() for r, cells in enumerate(rows)) + "\n"


_COLORS = {Kind.F: "#f4b03e", Kind.B: "#7ed957", Kind.W: "#7abaf2"}


def render_png(timeline: Timeline, path: str | Path) -> None:
    """A picture of the timeline in the manner of DeepSeek's: a row of boxes per rank over time, forwards orange,
    backwards green, weight gradients blue, each box labelled with its micro-batch (white text on a rank's second
    chunk and beyond), an overlapped pair drawn inside one thick border. Needs matplotlib (`dsv3c[watch]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = timeline.schedule
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * timeline.makespan), 0.5 * schedule.ranks + 1.2), dpi=100)
    for rank in range(schedule.ranks):
        y = schedule.ranks - 1 - rank
        local = schedule.chunks_of(rank)
        for start, end, action in _segments(timeline, rank):
            ax.add_patch(plt.Rectangle((start, y), end - start, 0.9, facecolor=_COLORS[action.kind],
                                       edgecolor="black", linewidth=0.5))
            color = "black" if local.index(action.stage) == 0 else "white"
            ax.text((start + end) / 2, y + 0.45, str(action.microbatch), ha="center", va="center", fontsize=7,
                    color=color)
        for unit in timeline.units(rank):
            if len(unit) == 2:
                ax.add_patch(plt.Rectangle((unit[0].start, y), unit[0].end - unit[0].start, 0.9, fill=False,
                                           edgecolor="black", linewidth=2))
    ax.set_xlim(0, timeline.makespan)
    ax.set_ylim(0, schedule.ranks)
    ranks = range(schedule.ranks)
    ax.set_yticks([schedule.ranks - 1 - r + 0.45 for r in ranks], [f"rank {r}" for r in ranks])
    ax.set_xlabel("time")
    ax.set_title(f"{schedule.name}: {schedule.ranks} ranks, {schedule.microbatches} micro-batches, "
                 f"bubble {timeline.bubble_fraction:.1%}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
