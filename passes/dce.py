"""`dsv3-dce`: removes pure ops whose results are unused, parameters and whole layer stacks included.

After another pass (or a hand edit) disconnects part of the model, this makes the IR say what is really computed,
so parameter counts and dumps stop reporting dead weights."""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern
from xdsl.traits import is_side_effect_free


class EraseUnusedPureOp(RewritePattern):
    def match_and_rewrite(self, op, rewriter: PatternRewriter) -> None:
        if op.results and all(not r.uses for r in op.results) and is_side_effect_free(op):
            rewriter.erase(op)


@dataclass(frozen=True)
class DeadCodeElimination(ModulePass):
    name = "dsv3-dce"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(EraseUnusedPureOp(), walk_reverse=True).rewrite_module(op)
