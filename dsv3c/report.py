"""The compile report: parameter counts read off the IR, memory and FLOPs from XLA, collectives from the HLO."""

from __future__ import annotations

import math
import re
from typing import Any

from xdsl.dialects.builtin import ModuleOp
from xdsl.dialects.func import FuncOp

from .dialects import dsv3
from .dialects.mtp import mtp_ops
from .dialects.sharding import MeshOp
from .hlo_text import CALLS, INSTRUCTION, computations
from .memory_breakdown import memory_breakdown
from .runtime.xla import BufferDump
from .targets import Chip, Target

_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(-start)?\("
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _routed_fraction(stack: dsv3.LayerStackOp) -> float:
    """top_k / experts of the router inside a layer stack (1 when it has none)."""
    for op in stack.body.walk():
        if isinstance(op, dsv3.RouterOp):
            return op.int_prop("top_k") / dsv3.shape_of(op.w)[1]
    return 1.0


def count_params(module: ModuleOp) -> dict[str, int]:
    """Total and per-token-active parameter counts, the MTP modules apart: what only a function's MTP losses need
    (`dialects/mtp.py`), and what only a function other than `@model` declares (the draft `@mtp` outlined from
    them). Routed expert weights (axes `exp` and `mlp`) count top_k/experts towards the active figure; everything
    else counts fully."""
    fraction: dict[str, float] = {}
    for op in module.walk():
        if isinstance(op, dsv3.LayerStackOp):
            for operand in op.operands[1:]:
                if isinstance(operand.owner, dsv3.ParamOp):
                    fraction[operand.owner.pname] = _routed_fraction(op)
    counts = {"total": 0, "active": 0, "mtp_total": 0, "mtp_active": 0}
    funcs = [f for f in module.ops if isinstance(f, FuncOp) and f.body.blocks]
    model = next((f for f in funcs if f.sym_name.data == "model"), None)
    mtp = {op for f in funcs for op in mtp_ops(f.body.block) if isinstance(op, dsv3.ParamOp)}
    seen: set[str] = set()
    for op in dsv3.walk_params(module):
        if op.pname in seen:  # a parameter shared by two functions (`@model` and the MTP draft `@mtp`) counts once
            continue
        seen.add(op.pname)
        size = math.prod(dsv3.shape_of(op.result))
        routed = "exp" in op.axis_names and "mlp" in op.axis_names
        active = size * fraction.get(op.pname, 1.0) if routed else size
        prefix = "mtp_" if op in mtp or (model is not None and not model.is_ancestor(op)) else ""
        counts[f"{prefix}total"] += size
        counts[f"{prefix}active"] += round(active)
    return counts


def model_flops(module: ModuleOp, batch: int, seq: int, train: bool) -> float:
    """FLOPs the model needs per step, from the IR alone: 2 per active weight per token for the matmuls (the
    embedding lookup excluded) plus causal attention, 2 * S^2/2 * heads * (qk + v) per sequence and layer; a training
    step costs three forward passes (forward, input gradient, weight gradient). Independent of how XLA lowers an op,
    so it is the numerator of MFU."""
    counts = count_params(module)
    embed = next((math.prod(dsv3.shape_of(p.result)) for p in dsv3.walk_params(module) if p.pname == "embed"), 0)
    matmul = 2.0 * (counts["active"] + counts["mtp_active"] - embed) * batch * seq
    attention = 0.0
    for stack in module.walk():
        if isinstance(stack, dsv3.LayerStackOp):
            for op in stack.body.walk():
                if isinstance(op, dsv3.AttentionOp):
                    *_, heads, qk_nope = dsv3.shape_of(op.q_nope)
                    width = qk_nope + dsv3.shape_of(op.q_pe)[-1] + dsv3.shape_of(op.v)[-1]
                    attention += stack.int_prop("count") * batch * seq * seq * heads * width
    return (matmul + attention) * (3.0 if train else 1.0)


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device bytes from XLA's buffer assignment; outputs that alias (donated) arguments count once."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    arguments, outputs, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias, code = mem.alias_size_in_bytes, mem.generated_code_size_in_bytes
    return {
        "arguments": int(arguments), "outputs": int(outputs), "temp": int(temp), "alias": int(alias),
        "code": int(code), "total": int(arguments + outputs - alias + temp + code),
    }


def flops(compiled: Any) -> float:
    """XLA's own estimate. It counts a `while` body once, whatever the trip count, so for scanned layers it is far
    below the real figure; the report keeps it beside `model_flops` for comparison only."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_BOUND = re.compile(r"s32\[\][^=]*constant\((\d+)\)")


def _executions(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per step: a while body runs its known trip count times its caller."""
    runs = {entry: 1}
    pending = [entry]
    while pending:
        name = pending.pop()
        for line in comps.get(name, []):
            loop = _WHILE.search(line)
            trips = {loop.group(2): _trip_count(line, comps.get(loop.group(1), []))} if loop else {}
            for callee in CALLS.findall(line):
                if callee in comps and callee not in runs:
                    runs[callee] = runs[name] * trips.get(callee, 1)
                    pending.append(callee)
    return runs


def _trip_count(while_line: str, condition: list[str]) -> int:
    """A while loop's trip count: XLA's `known_trip_count` where it kept it, else the bound its condition compares
    the induction variable with (scans count from 0)."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    bounds = [int(b) for line in condition for b in _BOUND.findall(line)]
    return max(bounds) if bounds else 1


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per kind of collective: `count` and result `bytes` as executed in one step (collectives inside a scanned
    layer count once per layer), `static` (occurrences in the program text) and `async` (started asynchronously,
    so compute can be scheduled between start and done)."""
    comps, entry = computations(hlo_text)
    runs = _executions(comps, entry) if entry else {}
    found: dict[str, dict[str, int]] = {}
    for name, lines in (comps.items() if comps else [("", hlo_text.splitlines())]):
        for line in lines:
            match = _COLLECTIVE.search(line)
            if not match:
                continue
            kind, started = match.group(2), bool(match.group(3))
            nbytes = sum(
                _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                for dtype, dims in _SHAPE.findall(match.group(1))
            )
            times = runs.get(name, 1)
            entry_ = found.setdefault(kind, {"count": 0, "bytes": 0, "static": 0, "async": 0})
            entry_["count"] += times
            entry_["bytes"] += times * nbytes
            entry_["static"] += 1
            entry_["async"] += int(started)
    return found


_COMPUTE = {"fusion", "convolution", "dot", "custom-call"}
_COLLECTIVE_KINDS = {"all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute"}


def overlap(hlo_text: str) -> dict[str, dict[str, float]]:
    """Per kind of asynchronous collective (`all-to-all-start` ... `all-to-all-done`): how many there are, how many
    have compute (fusions, dots, convolutions, custom calls) scheduled between start and done, and the mean number of
    such ops inside. Read off the scheduled HLO, where instruction order is execution order."""
    comps, _ = computations(hlo_text)
    stats: dict[str, dict[str, float]] = {}
    for lines in comps.values():
        parsed = [m.groups() for m in map(INSTRUCTION.match, lines) if m]
        open_starts: dict[str, tuple[str, int]] = {}
        for position, (name, opcode, rest) in enumerate(parsed):
            if opcode.endswith("-start"):
                # `all-to-all-start` on GPU; on TPU an `async-start` named after what it wraps
                base = opcode if opcode != "async-start" else (name if "-start" in name else "async-start")
                kind = re.sub(r"[.\d]+$", "", base.rsplit("-start", 1)[0])
                if kind in _COLLECTIVE_KINDS:
                    open_starts[name] = (kind, position)
            elif opcode.endswith("-done"):
                operand = re.match(r"\s*%?([\w.\-]+)", rest)
                started = open_starts.pop(operand.group(1), None) if operand else None
                if started is None:
                    continue
                kind, begin = started
                inside = sum(1 for _, op, _ in parsed[begin + 1 : position] if op in _COMPUTE)
                entry = stats.setdefault(kind, {"count": 0, "with_compute": 0, "compute_ops_inside": 0})
                entry["count"] += 1
                entry["with_compute"] += int(inside > 0)
                entry["compute_ops_inside"] += inside
    for entry in stats.values():
        entry["mean_compute_ops_inside"] = entry.pop("compute_ops_inside") / entry["count"]
    return stats


def build_report(
    module: ModuleOp,
    compiled: Any,
    compiled_text: str,
    target: Target,
    devices: int,
    *,
    mode: str,
    batch: int,
    seq: int,
    shard_mode: str,
    pipeline: str,
    compile_seconds: dict[str, float],
    buffers: BufferDump | None = None,
) -> dict[str, Any]:
    """The `--report` dictionary (CONTRACT.md), with memory against HBM and a roofline bound on step time."""
    counts = count_params(module)
    memory = memory_report(compiled)
    model = model_flops(module, batch, seq, train=mode == "train")
    comms = collectives(compiled_text)
    chip = target.chip
    report: dict[str, Any] = {
        "target": target.name,
        "devices": devices,
        "mesh": _mesh_sizes(module),
        "shard_mode": shard_mode,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "vocab": model_dims(module)[0],
        "params_total": counts["total"],
        "params_active_per_token": counts["active"],
        "params_mtp": counts["mtp_total"],
        "params_mtp_active_per_token": counts["mtp_active"],
        "memory_per_device_bytes": memory,
        "flops_per_step": model,
        "xla_flops_per_step": flops(compiled),
        "collectives": comms,
        "async_overlap": overlap(compiled_text),
        "compile_seconds": compile_seconds,
        "pipeline": pipeline,  # the passes that ran; a pipelined train step's schedule replaces it (program.py)
        "passes": pipeline,
        "warnings": [],
    }
    if chip.hbm_bytes:
        total = memory.get("total", 0)
        report["hbm_per_device_bytes"] = chip.hbm_bytes
        report["fits_hbm"] = total <= chip.hbm_bytes
        if total > chip.hbm_bytes:
            report["warnings"].append(
                f"needs {total / 2**30:.1f} GiB per device but a {chip.kind} has {chip.hbm_bytes / 2**30:.0f} GiB: "
                "use more chips, more FSDP/expert sharding, or recompute"
            )
    breakdown = memory_breakdown(buffers, compiled_text, *model_dims(module)) if buffers is not None else None
    if breakdown is not None:
        report["memory_breakdown"] = breakdown.parts
        report["memory_peak"] = {
            "phase": breakdown.peak_phase, "instruction": breakdown.peak_instruction,
            "in_use": sum(breakdown.parts.values()), "temp": memory.get("temp", 0),
        }
    attach_roofline(report, chip, train=mode == "train")
    return report


ROOFLINE_NOTE = (
    "a lower bound on step time, not a prediction: model FLOPs at the chip's peak, each argument byte read from HBM "
    "once per pass, collective bytes at full interconnect bandwidth; 'perfect_overlap' assumes all three overlap "
    "fully, 'no_overlap' that none do"
)


def attach_roofline(report: dict[str, Any], chip: Chip, train: bool) -> None:
    """Sets `step_time_bound_s` and `mfu_upper_bound` from the report's FLOPs, memory and collectives (nothing
    where the chip's peak is unknown, as on a CPU). The MFU bound is what perfect overlap at peak throughput would
    give: a ceiling, which real steps stay well below."""
    if not chip.peak_bf16_flops:
        return
    bounds = roofline(
        report["flops_per_step"], report["memory_per_device_bytes"], report["collectives"], chip,
        report["devices"], train=train,
    )
    report["step_time_bound_s"] = {**bounds, "note": ROOFLINE_NOTE}
    report["mfu_upper_bound"] = bounds["compute"] / bounds["perfect_overlap"] if bounds["perfect_overlap"] else 0.0


def roofline(
    model_flops_: float, memory: dict[str, int], comms: dict[str, dict[str, int]], chip: Chip, devices: int,
    train: bool,
) -> dict[str, float]:
    """Seconds per step if bound by compute (model FLOPs at peak), by HBM (each argument byte read once per pass:
    three passes in training) or by collectives (bytes moved over the chip's interconnect); `perfect_overlap` is the
    largest of the three, `no_overlap` their sum."""
    compute = model_flops_ / (devices * chip.peak_bf16_flops)
    hbm = (3 if train else 1) * memory.get("arguments", 0) / chip.hbm_bandwidth
    network = sum(c["bytes"] for c in comms.values()) / chip.interconnect_bandwidth
    return {
        "compute": compute, "memory": hbm, "collectives": network,
        "perfect_overlap": max(compute, hbm, network), "no_overlap": compute + hbm + network,
    }


def _mesh_sizes(module: ModuleOp) -> dict[str, int]:
    op = next((op for op in module.ops if isinstance(op, MeshOp)), None)
    return op.sizes if op else {}


def model_dims(module: ModuleOp) -> tuple[int, int]:
    """(vocabulary, hidden size), read off the embedding table; (0, 0) for a module without one."""
    embed = next((p for p in dsv3.walk_params(module) if p.pname == "embed"), None)
    if embed is None:
        return 0, 0
    vocab, hidden = dsv3.shape_of(embed.result)
    return vocab, hidden
