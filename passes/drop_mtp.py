"""`dsv3-drop-mtp`: removes the multi-token-prediction modules, for inference.

MTP only adds training signal (or a draft for speculative decoding); a forward or serving program does not need it.
The pass erases the MTP outputs and bias updates; dead-code elimination then removes the ops, layer stacks and
parameters that only fed them."""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    GreedyRewritePatternApplier,
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)

from ..dialects import dsv3
from .dce import DeadCodeElimination


class EraseMTPOutput(RewritePattern):
    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.OutputOp, rewriter: PatternRewriter) -> None:
        if op.output_name.data.startswith("mtp_"):
            rewriter.erase(op)


class EraseMTPBiasUpdate(RewritePattern):
    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.BiasUpdateOp, rewriter: PatternRewriter) -> None:
        if op.param.data.startswith("mtp."):
            rewriter.erase(op)


@dataclass(frozen=True)
class DropMTP(ModulePass):
    name = "dsv3-drop-mtp"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(GreedyRewritePatternApplier([EraseMTPOutput(), EraseMTPBiasUpdate()])).rewrite_module(op)
        DeadCodeElimination().apply(ctx, op)
