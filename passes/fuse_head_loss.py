"""`dsv3-fuse-head-loss`: the output head and its cross-entropy as one op that never holds the full logits.

A language-model loss `dsv3.cross_entropy(dsv3.matmul(h, head), labels, mask)` materialises f32 logits [B, S, V]
and, in the backward pass, their gradient: for DeepSeek-V3's 129,280-word vocabulary that is 1 GiB per 2,048 tokens
each. The pass rewrites it into `dsv3.head_loss %h, %head, %labels, %mask {chunks = N}`, which the lowering computes
N slices of the sequence at a time, recomputing each slice's logits in the backward pass. The matmul stays only while
something else reads the logits (the `logits` output of a forward step; a train step drops it).

Options: `chunks` (default 8; a sequence that `chunks` does not divide uses the largest divisor below it), and
`grads`, when the gradients of h and the head are computed: `backward` (default: the backward pass recomputes each
slice's logits, the least memory) or `forward` (`grads = #dsv3<head_loss_grads forward>`: the forward pass computes
them from the logits it has just made, since the loss is a scalar and the backward pass only scales them; one head
GEMM fewer, and neither the logits nor their gradient are kept, only the gradients themselves).

Not in the TPU's default pipeline: on deepseek3-test / tpu-v5p-8 the step's peak is elsewhere (in the layers'
backward), and the slices' weight-gradient carry added 0.3 GiB there (benchmarks/RESULTS.md). It pays where the logits
are the peak: short models with large vocabularies, long sequences. The CPU's single-device training runs it with
`grads=forward` for speed: XLA:CPU spends more on the unfused head's backward (the logits' gradient written
transposed for the weight gradient, the softmax and one-hot passes) than on its GEMMs.
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
    def __init__(self, chunks: int, grads: dsv3.HeadLossGrads):
        self.chunks = chunks
        self.grads = grads

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.CrossEntropyOp, rewriter: PatternRewriter) -> None:
        head = op.logits.owner
        if not isinstance(head, dsv3.MatmulOp):
            return
        fused = dsv3.HeadLossOp(head.x, head.w, op.labels, op.mask, self.chunks, self.grads)
        if head.kernel is not None:  # the head GEMM's kernel stays the head GEMM's
            fused.properties["kernel"] = head.kernel
        rewriter.replace(op, fused)
        if not head.result.uses:
            rewriter.erase(head)


@dataclass(frozen=True)
class FuseHeadLossPass(ModulePass):
    name = "dsv3-fuse-head-loss"

    chunks: int = 8
    grads: str = dsv3.HeadLossGrads.BACKWARD.value

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.chunks < 1:
            raise PassFailedException("dsv3-fuse-head-loss: chunks must be at least 1")
        choices = [g.value for g in dsv3.HeadLossGrads]
        if self.grads not in choices:
            raise PassFailedException(f"dsv3-fuse-head-loss: grads must be one of {', '.join(choices)}, "
                                      f"got '{self.grads}'")
        pattern = FuseHeadLoss(self.chunks, dsv3.HeadLossGrads(self.grads))
        PatternRewriteWalker(pattern, apply_recursively=False).rewrite_module(op)
