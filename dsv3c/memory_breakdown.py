"""Where a train step's temporary memory goes, read the way a memory profiler reads it: the buffers XLA's buffer
assignment keeps live at the moment of peak use, each attributed to a named part.

XLA packs every temporary of a program into one `preallocated-temp` allocation per memory space; its size is the
report's `temp`. The dump of the buffer assignment gives each value's (offset, size) in it, the live-range dump gives
each value's [start, end] in the program's flattened schedule, and the optimized HLO gives each instruction's opcode
and the JAX name stack it came from (`jit(step)/transpose(jvp())/while/body/...`). At each point of the schedule the
bytes in use are the union of the live values' byte ranges (values that alias share their range, so they count once);
the peak is where that union is largest, and the parts are that union split by where its buffers came from. What the
parts do not cover is fragmentation of the packing.

Parts, checked in this order for each buffer live at the peak:
- `logits`: a buffer with a vocabulary-sized dimension (the logits, their softmax and gradient), unless it is shaped
  like a weight (a parameter's per-device shape, or the whole [hidden, vocab] output head or embedding);
- `gathered_weights`: the result of an all-gather (FSDP weights gathered for use, in forward or backward), or of a
  forward all-reduce of a weight-shaped buffer (XLA gathers a replicated operand that way);
- `gradients`: a weight-shaped buffer made by the backward pass, or a reduce-scatter result
  (the gradient buffers and their accumulators across the layer scan);
- `optimizer`: made inside the optimizer update (`jax.named_scope("optimizer")` in `runtime/train.py`);
- `weight_copies`: any other weight-shaped buffer: a copy, relayout or compute-dtype cast of a
  whole weight (XLA hoisting a per-layer cast out of the layer scan makes one per stacked weight);
- `saved_activations`: made by the forward pass and still live in the backward one (the residuals each layer keeps
  for its gradient, stacked over the layers by the scan);
- `layer_working_set`: made inside a layer scan's body in the phase of the peak (recomputed activations, attention
  and expert intermediates of the layer being processed);
- `other`: everything else (embedding, loss, small bookkeeping).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .hlo_text import CALLS, INSTRUCTION, computations
from .runtime.xla import BufferDump

_ALLOCATION = re.compile(r"^allocation \d+: size (\d+),(.*)$")
_VALUE = re.compile(r"^ value: <\d+ ([\w.\-]+)(\{[\d,]*\})?(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
_LIVE = re.compile(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DIMS = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_ENTRY_PARAM = re.compile(r"^\s*%[\w.\-]+\s*=\s*[a-z]\w*\[([\d,]*)\]\S*\s+parameter\(\d+\)")

PARTS = (
    "logits", "gathered_weights", "gradients", "optimizer", "weight_copies", "saved_activations",
    "layer_working_set", "other",
)


@dataclass(frozen=True)
class _Buffer:
    """A value in a temp allocation: where it lives (allocation, offset, size) and when (schedule positions)."""

    name: str
    allocation: int
    offset: int
    size: int
    dims: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Instruction:
    """Where a buffer was made: the opcode, JAX's name stack (empty where XLA made the instruction), whether it runs
    in a loop body (a layer scan) and whether in the backward pass."""

    opcode: str = ""
    op_name: str = ""
    in_loop: bool = False
    backward: bool = False


@dataclass(frozen=True)
class Breakdown:
    """The temporaries at the step's peak: bytes per part (PARTS), and where the peak is."""

    parts: dict[str, int]
    peak_instruction: str
    peak_phase: str  # "forward", "backward" or "update"


def memory_breakdown(buffers: BufferDump, hlo_text: str, vocab: int, hidden: int) -> Breakdown | None:
    """Bytes per part of the temporaries live at the peak of the step, per device (None when XLA's dump holds no
    temp allocation). The parts add up to the bytes in use at the peak, which is XLA's `temp` less the packing's
    fragmentation."""
    live_ranges = buffers.live_ranges
    temps = _temp_buffers(buffers.assignment, live_ranges)
    if not temps:
        return None
    instructions = _instructions(hlo_text)
    weights = _entry_parameter_dims(hlo_text) | {(hidden, vocab), (vocab, hidden)}
    peak_time, live = _peak(temps)
    peak_name = _instruction_at(live_ranges, peak_time)
    at_peak = instructions.get(peak_name, _Instruction())
    parts = dict.fromkeys(PARTS, 0)
    for buffer, nbytes in live:
        made = instructions.get(buffer.name, _Instruction())
        parts[_part(buffer, made, vocab, weights, at_peak.backward)] += nbytes
    phase = "backward" if at_peak.backward else "update" if "optimizer" in at_peak.op_name.split("/") else "forward"
    return Breakdown(parts, peak_name, phase)


def _part(buffer: _Buffer, made: _Instruction, vocab: int, weights: set[tuple[int, ...]], backward_peak: bool) -> str:
    named = buffer.name.split(".")[0]
    weight = buffer.dims in weights
    if vocab in buffer.dims and not weight:
        return "logits"
    if made.opcode.startswith("all-gather") or named == "all-gather" or (
        weight and made.opcode.startswith("all-reduce") and not made.backward
    ):
        return "gathered_weights"
    if made.opcode.startswith("reduce-scatter") or named == "reduce-scatter" or (made.backward and weight):
        return "gradients"
    if "optimizer" in made.op_name.split("/"):
        return "optimizer"
    if weight:
        return "weight_copies"
    if backward_peak and not made.backward and (made.in_loop or made.op_name):
        return "saved_activations"
    if made.in_loop:
        return "layer_working_set"
    return "other"


def describe(breakdown: Breakdown) -> str:
    """The bytes in use at the peak and their parts, largest first, in GiB: what a person reads to see where the
    memory went."""
    parts = sorted(breakdown.parts.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{name.replace('_', ' ')} {size / 2**30:.2f}" for name, size in parts if size >= 2**20)
    in_use = sum(breakdown.parts.values()) / 2**30
    return f"at the peak ({breakdown.peak_phase}) {in_use:.2f} GiB in use, of which {listed}"


def _temp_buffers(buffer_assignment: str, live_ranges: str) -> list[_Buffer]:
    """The values of the default memory space's temp allocations, with their live ranges."""
    spans = {(m.group(1), m.group(2)): (int(m.group(3)), int(m.group(4)))
             for m in map(_LIVE.match, live_ranges.splitlines()) if m}
    buffers: list[_Buffer] = []
    allocation, in_temp = -1, False
    for line in buffer_assignment.splitlines():
        header = _ALLOCATION.match(line)
        if header:
            allocation += 1
            attributes = header.group(2)
            in_temp = "preallocated-temp" in attributes and not re.search(r"color [1-9]", attributes)
            continue
        value = _VALUE.match(line) if in_temp else None
        if value is None:
            continue
        name, index = value.group(1), value.group(2) or "{}"
        span = spans.get((name, index))
        dims = _DIMS.match(value.group(5))
        if span is None or dims is None:
            continue
        shape = tuple(int(d) for d in dims.group(1).split(",") if d)
        buffers.append(_Buffer(name, allocation, int(value.group(4)), int(value.group(3)), shape, *span))
    return buffers


def _peak(buffers: list[_Buffer]) -> tuple[int, list[tuple[_Buffer, int]]]:
    """The schedule position where the most bytes are in use, and each live buffer's share of them. Values that
    alias one buffer sit at the same offset, so bytes in use are counted per distinct (offset, size) range; a sweep
    over the start and end events finds the peak in one pass."""
    events: dict[int, list[tuple[int, _Buffer]]] = {}
    for buffer in buffers:
        events.setdefault(buffer.start, []).append((1, buffer))
        events.setdefault(buffer.end + 1, []).append((-1, buffer))
    holders: dict[tuple[int, int, int], int] = {}
    used, best_time, best_bytes = 0, 0, -1
    for time in sorted(events):
        for change, buffer in events[time]:
            key = (buffer.allocation, buffer.offset, buffer.size)
            before = holders.get(key, 0)
            holders[key] = before + change
            if before == 0 and change > 0:
                used += buffer.size
            elif before == 1 and change < 0:
                used -= buffer.size
        if used > best_bytes:
            best_time, best_bytes = time, used
    at_peak = [b for b in buffers if b.start <= best_time <= b.end]
    return best_time, _shares(at_peak)


def _shares(live: list[_Buffer]) -> list[tuple[_Buffer, int]]:
    """Each buffer's bytes not already covered by a larger live buffer of the same allocation."""
    shares: list[tuple[_Buffer, int]] = []
    covered: dict[int, list[tuple[int, int]]] = {}
    for buffer in sorted(live, key=lambda b: -b.size):
        begin, end = buffer.offset, buffer.offset + buffer.size
        own = end - begin
        for lo, hi in covered.get(buffer.allocation, []):
            own -= max(0, min(end, hi) - max(begin, lo))
        if own > 0:
            shares.append((buffer, own))
        covered.setdefault(buffer.allocation, []).append((begin, end))
    return shares


def _instruction_at(live_ranges: str, time: int) -> str:
    """The instruction at `time` in the flattened schedule that the live-range dump lists first."""
    in_sequence = False
    for line in live_ranges.splitlines():
        if line.strip() == "InstructionSequence:":
            in_sequence = True
            continue
        if in_sequence:
            position, _, name = line.strip().partition(":")
            if not position.isdigit():
                break
            if int(position) == time:
                return name
    return ""


def _instructions(hlo_text: str) -> dict[str, _Instruction]:
    """Every instruction with its opcode, JAX name stack, and whether it runs inside a loop body and in the backward
    pass: read off its own name stack, or, where XLA made it and left none, off the loop that runs it."""
    comps, entry = computations(hlo_text)
    loops: dict[str, bool] = {}  # computation -> whether the loop that runs it is the backward one
    pending: list[tuple[str, bool | None]] = [(entry, None)]
    seen = {entry}
    while pending:
        name, backward_loop = pending.pop()
        if backward_loop is not None:
            loops[name] = backward_loop
        for line in comps.get(name, []):
            op_name = _OP_NAME.search(line)
            is_while = " while(" in line
            for callee in CALLS.findall(line):
                if callee in comps and callee not in seen:
                    seen.add(callee)
                    if is_while:
                        inner = "transpose(" in (op_name.group(1) if op_name else "") or bool(backward_loop)
                    else:
                        inner = backward_loop
                    pending.append((callee, inner))
    found: dict[str, _Instruction] = {}
    for comp, lines in comps.items():
        for line in lines:
            match = INSTRUCTION.match(line)
            if not match:
                continue
            op_name = _OP_NAME.search(line)
            name_stack = op_name.group(1) if op_name else ""
            backward = "transpose(" in name_stack if name_stack else bool(loops.get(comp))
            found[match.group(1)] = _Instruction(match.group(2), name_stack, comp in loops, backward)
    return found


def _entry_parameter_dims(hlo_text: str) -> set[tuple[int, ...]]:
    """Per-device dimensions of the step's array arguments (its parameters and optimizer state) in the ENTRY
    computation, which a gradient buffer shares."""
    dims: set[tuple[int, ...]] = set()
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
            continue
        if in_entry:
            if line.startswith("}"):
                break
            match = _ENTRY_PARAM.match(line)
            if match and match.group(1):
                dims.add(tuple(int(d) for d in match.group(1).split(",")))
    return dims
