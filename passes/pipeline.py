"""`dsv3-pipeline`: cut the model into pipeline chunks of balanced cost and record the schedule that runs them.

`-p 'dsv3-pipeline{ranks=4 schedule=dualpipev microbatches=16}'` asks for `ranks` pipeline stages (devices along a
`pipe` mesh axis) under one of the schedules of `runtime/schedules.py` (gpipe, 1f1b, interleaved with `virtual`
chunks per rank, zb, dualpipev with two chunks per rank in a V). The schedule fixes how many chunks there are and
which rank holds each; the pass decides which layers each chunk takes.

The cut: the main model's layers, in order across its layer stacks (3 dense then 58 MoE layers in DeepSeek-V3),
go to the chunks in contiguous runs, chunk 0 also takes what comes before the first stack (the embedding) and the
last chunk what comes after the last (the output head, the losses and the MTP modules). Each layer and each of those
ends is weighed by its forward FLOPs per token (2 per active weight, routed experts at top_k/experts, plus causal
attention at `seq` tokens), and the cut minimises the costliest chunk, the one every other stage waits for, exactly
(dynamic programming over the layer boundaries). The result is in the IR: a `dsv3.pipeline` op (ranks, schedule,
micro-batches, placement, each chunk's cost) and `chunks` on each main-model layer stack (`dialects/pipeline.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ArrayAttr, IntegerAttr, ModuleOp
from xdsl.ir import Operation
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from ..dialects import dsv3
from ..dialects.pipeline import PipelineOp, PipelineSchedule, split_main_model
from ..dialects.quant import FP8MatmulOp
from ..frontend.errors import UserError
from ..runtime.model import model_func
from ..runtime.schedules import build_schedule


@dataclass(frozen=True)
class PipelinePass(ModulePass):
    """Cuts the main model into the schedule's chunks (module docstring: the cut, the options)."""

    name = "dsv3-pipeline"

    ranks: int = 2
    schedule: str = "1f1b"
    microbatches: int = 0
    """Micro-batches per step; 0 takes twice the ranks (DualPipeV's minimum, and enough for 1F1B's steady state)."""
    virtual: int = 2
    """Chunks per rank of the interleaved schedule (DualPipeV always has two, the others one)."""
    seq: int = 4096
    """Tokens per sequence the attention cost is weighed at."""

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if any(isinstance(o, PipelineOp) for o in op.ops):
            raise UserError("dsv3-pipeline: the module is already pipelined (it has a dsv3.pipeline op)")
        if self.schedule not in set(PipelineSchedule):
            raise UserError(f"dsv3-pipeline: unknown schedule '{self.schedule}' "
                            f"(expected {', '.join(PipelineSchedule)})")
        microbatches = self.microbatches or 2 * self.ranks
        try:
            schedule = build_schedule(self.schedule, self.ranks, microbatches, self.virtual)
        except ValueError as err:
            raise UserError(f"dsv3-pipeline: {err}") from None
        block = model_func(op).body.block
        try:
            stacks, prologue, epilogue = split_main_model(block)
        except ValueError as err:
            raise UserError(f"dsv3-pipeline: {err}") from None
        layers = [_layer_cost(stack, self.seq) for stack in stacks for _ in range(stack.int_prop("count"))]
        chunks = len(schedule.placement)
        if len(layers) < chunks:
            raise UserError(f"dsv3-pipeline: {len(layers)} layers cannot fill the {chunks} chunks of {self.schedule} "
                            f"on {self.ranks} ranks: use fewer ranks")
        head = sum(_cost(o, self.seq) for o in prologue)
        tail = sum(_cost(o, self.seq) for o in epilogue)
        ends = balanced_cut(layers, chunks, head, tail)
        costs = [sum(layers[start:end]) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        costs[0] += head
        costs[-1] += tail
        first = 0
        for stack in stacks:
            count = stack.int_prop("count")
            stack.properties["chunks"] = ArrayAttr([
                IntegerAttr(max(0, min(end, first + count) - max(start, first)), 64)
                for start, end in zip([0, *ends[:-1]], ends, strict=True)
            ])
            first += count
        placement = [schedule.placement[c] for c in range(chunks)]
        pipeline = PipelineOp(self.ranks, PipelineSchedule(self.schedule), microbatches, placement, costs)
        Rewriter.insert_op(pipeline, InsertPoint.at_start(op.body.block))


def balanced_cut(layers: list[float], chunks: int, prologue: float, epilogue: float) -> list[int]:
    """End index (exclusive) of each chunk's run of layers, every chunk at least one layer, minimising the costliest
    chunk (chunk 0 also carries `prologue`, the last `epilogue`). best[c][i]: the least possible cost of the
    costliest of c chunks over the first i layers."""
    n = len(layers)
    prefix = [0.0]
    for cost in layers:
        prefix.append(prefix[-1] + cost)
    best = [[math.inf] * (n + 1) for _ in range(chunks + 1)]
    split = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, chunks + 1):
        extra_first = prologue if c == 1 else 0.0
        for i in range(c, n - (chunks - c) + 1):
            extra_last = epilogue if c == chunks else 0.0
            for j in range(c - 1, i):
                worst = max(best[c - 1][j], prefix[i] - prefix[j] + extra_first + extra_last)
                if worst < best[c][i]:
                    best[c][i], split[c][i] = worst, j
    ends, i = [], n
    for c in range(chunks, 0, -1):
        ends.append(i)
        i = split[c][i]
    return ends[::-1]


def _layer_cost(stack: dsv3.LayerStackOp, seq: int) -> float:
    """Forward FLOPs per token of one layer of `stack`."""
    return sum(_cost(o, seq) for o in stack.body.block.ops)


def _cost(op: Operation, seq: int) -> float:
    """Forward FLOPs per token of `op`: 2 per weight of a matmul, the active share of the routed experts, causal
    attention at `seq` tokens (each query sees seq/2 keys on average); a layer stack counts all its layers."""
    if isinstance(op, dsv3.LayerStackOp):
        return op.int_prop("count") * _layer_cost(op, seq)
    if isinstance(op, dsv3.MatmulOp | FP8MatmulOp | dsv3.RouterOp):
        return 2.0 * math.prod(dsv3.shape_of(op.w))
    if isinstance(op, dsv3.ExpertsOp):
        experts, top_k = dsv3.shape_of(op.w_gate)[0], dsv3.shape_of(op.indices)[-1]
        weights = sum(math.prod(dsv3.shape_of(w)) for w in (op.w_gate, op.w_up, op.w_down))
        return 2.0 * weights * top_k / experts
    if isinstance(op, dsv3.AttentionOp):
        *_, heads, nope = dsv3.shape_of(op.q_nope)
        width = nope + dsv3.shape_of(op.q_pe)[-1] + dsv3.shape_of(op.v)[-1]
        return 2.0 * (seq / 2) * heads * width
    return sum(_cost(inner, seq) for region in op.regions for inner in region.walk())
