"""The compile report: parameter counts read off the IR, memory and FLOPs from XLA, collectives from the HLO."""

from __future__ import annotations

import math
import re
from typing import Any

from xdsl.dialects.builtin import ModuleOp

from .dialects import dsv3

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
    """Total and per-token-active parameter counts, the MTP modules apart. Routed expert weights (axes `exp` and
    `mlp`) count top_k/experts towards the active figure; everything else counts fully."""
    fraction: dict[str, float] = {}
    for op in module.walk():
        if isinstance(op, dsv3.LayerStackOp):
            for operand in op.operands[1:]:
                if isinstance(operand.owner, dsv3.ParamOp):
                    fraction[operand.owner.pname] = _routed_fraction(op)
    counts = {"total": 0, "active": 0, "mtp_total": 0, "mtp_active": 0}
    for op in dsv3.walk_params(module):
        size = math.prod(dsv3.shape_of(op.result))
        routed = "exp" in op.axis_names and "mlp" in op.axis_names
        active = size * fraction.get(op.pname, 1.0) if routed else size
        prefix = "mtp_" if op.pname.startswith("mtp.") else ""
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


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each kind of collective in compiled HLO text."""
    found: dict[str, dict[str, int]] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        kind = match.group(2)
        nbytes = sum(
            _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _SHAPE.findall(match.group(1))
        )
        entry = found.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return found
