"""Evaluating a small piece of dsv3 IR through the lowering registry, for op-level tests."""

from __future__ import annotations

from xdsl.dialects.func import FuncOp

from dsv3c.dialects.text import parse_ir
from dsv3c.runtime.lower import LoweringContext, lower_block


def ir_function(text: str, fp8_backend: str = "exact"):
    """Parses (and verifies) a module holding one `func.func`; returns a function that binds the block arguments,
    lowers the body with `lower_block` (FP8 GEMMs on `fp8_backend`) and returns what `func.return` returns (jit it
    to trace once)."""
    module = parse_ir(text)
    (func,) = [op for op in module.ops if isinstance(op, FuncOp)]
    block = func.body.block

    def run(*args):
        ctx = LoweringContext(params={}, fp8_backend=fp8_backend)
        for arg, value in zip(block.args, args, strict=True):
            ctx.env[arg] = value
        return lower_block(block, ctx)

    return run
