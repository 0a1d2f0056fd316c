"""FP8 for a compile: asking for the pass, choosing native FP8 or emulation for the target, and reporting it.

`dsv3c.compile(..., fp8="native" | "emulate")` (CLI `--fp8`) adds `dsv3-fp8-quant` to the pipeline unless `-p`
already names it. Whoever inserted the FP8 ops, the target then decides how they run (its `dsv3-kernels` pass writes
the choice into the IR as the module attribute `dsv3.fp8_backend`):
- GPUs with FP8 tensor cores (H100, H200): native FP8 GEMMs, unless emulation is asked for; on one GPU the
  fine-grained (block-scaled) ones run as the Pallas kernels of `runtime/kernels/fp8_gemm.py`;
- the CPU: exact emulation (FP8 values, exact products and block sums, FP32 accumulation across blocks), the
  reference the tests check bit for bit;
- TPU v5p/v5e/v6e have no FP8 units (int8 only): refused, unless emulation is asked for (FP8 values widened to
  BF16, FP32 accumulation on the MXU).
The report's `fp8` entry says which happened and why, and how many FP8 GEMMs the compiled program holds.
"""

from __future__ import annotations

import re
from typing import Any

from xdsl.dialects.builtin import ModuleOp, StringAttr

from .dialects.dsv3 import ExpertsOp
from .dialects.quant import FP8MatmulOp
from .frontend.errors import UserError
from .runtime.lower.registry import FP8_BACKEND_ATTR

FP8_MODES = ("off", "native", "emulate")


def check_fp8_option(fp8: str | None) -> str:
    """The requested FP8 mode, `off` for None; anything else is a user error."""
    fp8 = fp8 or "off"
    if fp8 not in FP8_MODES:
        raise UserError(f"unknown fp8 mode '{fp8}' (expected {', '.join(FP8_MODES)})")
    return fp8


def count_quantized(module: ModuleOp) -> dict[str, int]:
    """FP8 matmuls and FP8 expert blocks in the IR."""
    ops = list(module.walk())
    return {
        "matmuls": sum(isinstance(op, FP8MatmulOp) for op in ops),
        "experts": sum(isinstance(op, ExpertsOp) and op.quantized for op in ops),
    }


_WHY = {
    "exact": ("emulated", "exact emulation (FP8 values, exact block sums, FP32 accumulation across blocks)"),
    "emulate": ("emulated", "emulation: FP8 values widened to BF16, FP32 sums"),
    "native": ("native", "native FP8 GEMMs on the target's FP8 tensor cores"),
    "pallas": ("native", "block-scaled FP8 Pallas (Triton) kernels for the fine-grained GEMMs, native FP8 GEMMs for "
                         "the rest, on the target's FP8 tensor cores"),
}


def fp8_mode(module: ModuleOp, fp8: str) -> tuple[str, str]:
    """(`native` | `emulated` | `off`, why), as the IR's FP8 ops and the backend `dsv3-kernels` chose say."""
    counts = count_quantized(module)
    if not counts["matmuls"] and not counts["experts"]:
        return "off", "no FP8 ops in the IR" if fp8 != "off" else "not asked for"
    backend = module.attributes.get(FP8_BACKEND_ATTR)
    return _WHY[backend.data if isinstance(backend, StringAttr) else "exact"]


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
