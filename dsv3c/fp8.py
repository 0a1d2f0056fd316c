"""FP8 for a compile: asking for the pass, choosing native FP8 or emulation for the target, and reporting it.

`dsv3c.compile(..., fp8="native" | "emulate")` (CLI `--fp8`) adds `dsv3-fp8-quant` to the pipeline unless `-p`
already names it. Whoever inserted the FP8 ops, the target then decides how they run:
- GPUs with FP8 tensor cores (H100, H200): native FP8 GEMMs, unless emulation is asked for;
- the CPU: exact emulation (FP8 values, exact products and block sums, FP32 accumulation across blocks), the
  reference the tests check bit for bit;
- TPU v5p/v5e/v6e have no FP8 units (int8 only): refused, unless emulation is asked for (FP8 values widened to
  BF16, FP32 accumulation on the MXU).
The report's `fp8` entry says which happened and why, and how many FP8 GEMMs the compiled program holds.
"""

from __future__ import annotations

import re
from typing import Any

from xdsl.dialects.builtin import ModuleOp

from .dialects.quant import FP8ExpertsOp, FP8MatmulOp
from .frontend.errors import UserError
from .runtime.lower.fp8 import set_backend
from .targets import Target

FP8_MODES = ("off", "native", "emulate")
PASS_NAME = "dsv3-fp8-quant"


def check_fp8_option(fp8: str | None) -> str:
    """The requested FP8 mode, `off` for None; anything else is a user error."""
    fp8 = fp8 or "off"
    if fp8 not in FP8_MODES:
        raise UserError(f"unknown fp8 mode '{fp8}' (expected {', '.join(FP8_MODES)})")
    return fp8


# Passes that must see the FP8 ops: `dsv3-remat` tags the quantised values, so that backward keeps FP8 copies of the
# activations (DeepSeek-V3's FP8 caching) rather than BF16 ones.
_AFTER_FP8 = ("dsv3-remat", "dsv3-overlap", "dsv3-shard")


def split_pipeline(pipeline: str) -> list[str]:
    """`a{x=1,2},b` -> [`a{x=1,2}`, `b`]: commas inside a pass's options do not separate passes."""
    passes, depth, start = [], 0, 0
    for i, char in enumerate(pipeline):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            passes.append(pipeline[start:i])
            start = i + 1
    passes.append(pipeline[start:])
    return [p.strip() for p in passes if p.strip()]


def with_fp8_pass(pipeline: str, fp8: str) -> str:
    """The pipeline with `dsv3-fp8-quant` added when FP8 is asked for and the pipeline does not run it: before
    the passes that act on what the model computes (recompute policy, scheduling, sharding), after the others."""
    if fp8 == "off" or PASS_NAME in pipeline:
        return pipeline
    passes = split_pipeline(pipeline)
    at = next((i for i, p in enumerate(passes) if p.split("{")[0] in _AFTER_FP8), len(passes))
    return ",".join([*passes[:at], PASS_NAME, *passes[at:]])


def count_quantized(module: ModuleOp) -> dict[str, int]:
    """FP8 matmuls and FP8 expert blocks in the IR."""
    ops = list(module.walk())
    return {
        "matmuls": sum(isinstance(op, FP8MatmulOp) for op in ops),
        "experts": sum(isinstance(op, FP8ExpertsOp) for op in ops),
    }


def resolve_fp8(module: ModuleOp, fp8: str, target: Target) -> tuple[str, str]:
    """(`native` | `emulated` | `off`, why), recorded on the module for the lowering. Refuses native FP8 on
    hardware without it."""
    counts = count_quantized(module)
    if not counts["matmuls"] and not counts["experts"]:
        set_backend(module, None)
        return "off", "no FP8 ops in the IR" if fp8 != "off" else "not asked for"
    chip = target.chip
    if chip.platform == "cpu":
        if fp8 == "native":
            raise UserError("target 'cpu' has no FP8 arithmetic: FP8 on the CPU is emulated (use --fp8 emulate)")
        backend, mode, why = "exact", "emulated", "the CPU has no FP8 units: exact emulation (float64 block sums)"
    elif fp8 == "emulate":
        backend, mode, why = "emulate", "emulated", "emulation asked for: FP8 values widened to BF16, FP32 sums"
    elif chip.has_fp8:
        backend, mode, why = "native", "native", f"{chip.kind} has FP8 tensor cores"
    else:
        raise UserError(
            f"target '{target.name}' ({chip.kind}) has no FP8 hardware (int8 only), so it cannot run the FP8 ops "
            "natively; ask for emulation with --fp8 emulate (fp8='emulate'), or compile without dsv3-fp8-quant"
        )
    set_backend(module, backend)
    return mode, why


_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%\S+\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s+=\s+(\S+)\s+(\S+?)\((.*)$")


def fp8_gemms(hlo_text: str) -> int:
    """How many GEMMs in compiled HLO take FP8 operands: `dot`s (as in XLA:GPU's Triton GEMM fusions) and
    custom calls (cuBLAS-LT's FP8 matmul), each operand's type looked up in its own computation."""
    count = 0
    types: dict[str, str] = {}
    for line in hlo_text.splitlines():
        if _COMPUTATION.match(line):
            types = {}
            for name, ty in re.findall(r"(\w[\w.\-]*):\s+(\w+)\[", line):
                types[name] = ty
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, ty, opcode, rest = match.groups()
        types[name] = ty.split("[")[0].lstrip("(")
        if opcode in ("dot", "custom-call"):
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            if any(types.get(o, "").startswith("f8") for o in operands):
                count += 1
    return count


def fp8_report(module: ModuleOp, mode: str, why: str, compiled_text: str) -> dict[str, Any]:
    """The report's `fp8` entry."""
    return {"mode": mode, "why": why, **count_quantized(module), "compiled_fp8_gemms": fp8_gemms(compiled_text)}
