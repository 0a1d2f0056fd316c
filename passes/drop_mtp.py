"""`dsv3-drop-mtp`: removes the multi-token-prediction modules, for inference.

MTP only adds training signal (or a draft for speculative decoding); a forward or serving program does not need it.
The pass erases the outputs and bias updates that belong to MTP (by the IR's structure, `dialects/mtp.py`: what the
`mtp_loss` outputs need beyond the logits); dead-code elimination then removes the ops, layer stacks and parameters
that only fed them."""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.dialects.func import FuncOp
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter

from ..dialects.mtp import mtp_sinks
from .dce import DeadCodeElimination


@dataclass(frozen=True)
class DropMTP(ModulePass):
    name = "dsv3-drop-mtp"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        # Not a rewrite pattern: whether a sink is MTP's depends on the whole function, not on the op alone.
        for func in [f for f in op.ops if isinstance(f, FuncOp) and f.body.blocks]:
            for sink in mtp_sinks(func.body.block):
                Rewriter.erase_op(sink)
        DeadCodeElimination().apply(ctx, op)
