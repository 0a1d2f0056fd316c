"""`dsv3-fuse-head-loss`: the output head and its cross-entropy as one op that never holds the full logits.

A language-model loss `dsv3.cross_entropy(dsv3.matmul(h, head), labels, mask)` materialises f32 logits [B, S, V]
and, in the backward pass, their gradient: for DeepSeek-V3's 129,280-word vocabulary that is 1 GiB per 2,048 tokens
each. The pass rewrites it into `dsv3.head_loss %h, %head, %labels, %mask {chunks = N}`, which the lowering computes
N slices of the sequence at a time, recomputing each slice's logits in the backward pass. The matmul stays only while
something else reads the logits (the `logits` output of a forward step; a train step drops it).

Option: `chunks` (default 8; a sequence that `chunks` does not divide uses the largest divisor below it).

Not in a default pipeline: on deepseek3-test / tpu-v5p-8 the step's peak is elsewhere (in the layers' backward), and
the slices' weight-gradient carry added 0.3 GiB there (benchmarks/RESULTS.md). It pays where the logits are the peak:
short models with large vocabularies, long sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)
from xdsl.utils.exceptions import PassFailedException

from ..dialects import dsv3


class FuseHeadLoss(RewritePattern):
    def __init__(self, chunks: int):
        self.chunks = chunks

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.CrossEntropyOp, rewriter: PatternRewriter) -> None:
        head = op.logits.owner
        if not isinstance(head, dsv3.MatmulOp):
            return
        fused = dsv3.HeadLossOp(head.x, head.w, op.labels, op.mask, self.chunks)
        rewriter.replace(op, fused)
        if not head.result.uses:
            rewriter.erase(head)


@dataclass(frozen=True)
class FuseHeadLossPass(ModulePass):
    name = "dsv3-fuse-head-loss"

    chunks: int = 8

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.chunks < 1:
            raise PassFailedException("dsv3-fuse-head-loss: chunks must be at least 1")
        PatternRewriteWalker(FuseHeadLoss(self.chunks), apply_recursively=False).rewrite_module(op)
