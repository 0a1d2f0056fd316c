"""Pipeline parallelism as IR: which layers form each model chunk, which rank holds each chunk, and the schedule.

`dsv3-pipeline` cuts the model's layers into chunks of balanced cost and writes the decision where a reader of the
dump sees it and a hand edit changes it: one `dsv3.pipeline` op at the top of the module (ranks, schedule,
micro-batches, chunk -> rank placement, each chunk's cost) and, on each main-model `dsv3.layer_stack`, `chunks`:
how many of its layers each chunk takes, in order. What comes before the first stack (the embedding) belongs to
chunk 0, what comes after the last (the head, the losses, the MTP modules) to the last chunk.
"""

from __future__ import annotations

from xdsl.dialects.builtin import ArrayAttr, IntegerAttr
from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import Block, Operation, SpacedOpaqueSyntaxAttribute
from xdsl.irdl import irdl_attr_definition, irdl_op_definition, prop_def
from xdsl.utils.str_enum import StrEnum

from .dsv3 import LayerStackOp, ParamOp, _Op
from .mtp import mtp_ops
from .sharding import ShardOp


class PipelineSchedule(StrEnum):
    """The static schedules `runtime/schedules.py` builds (its docstring describes each)."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    ZB = "zb"
    DUALPIPEV = "dualpipev"


@irdl_attr_definition
class PipelineScheduleAttr(EnumAttribute[PipelineSchedule], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<pipeline_schedule dualpipev>`."""

    name = "dsv3.pipeline_schedule"


@irdl_op_definition
class PipelineOp(_Op):
    """The pipeline of a training step: `ranks` devices along the mesh's `pipe` axis, `microbatches` per step,
    chunk `c` on rank `placement[c]`, and `cost[c]` the chunk's forward FLOPs per token (what the cut balanced)."""

    name = "dsv3.pipeline"
    ranks = prop_def(IntegerAttr)
    schedule = prop_def(PipelineScheduleAttr)
    microbatches = prop_def(IntegerAttr)
    placement = prop_def(ArrayAttr[IntegerAttr])
    cost = prop_def(ArrayAttr[IntegerAttr])
    assembly_format = "attr-dict"

    def __init__(
        self, ranks: int, schedule: PipelineSchedule, microbatches: int, placement: list[int], cost: list[float]
    ):
        super().__init__(properties={
            "ranks": IntegerAttr(ranks, 64),
            "schedule": PipelineScheduleAttr(schedule),
            "microbatches": IntegerAttr(microbatches, 64),
            "placement": ArrayAttr([IntegerAttr(r, 64) for r in placement]),
            "cost": ArrayAttr([IntegerAttr(round(c), 64) for c in cost]),
        })

    @property
    def chunk_ranks(self) -> list[int]:
        return [r.value.data for r in self.placement.data]

    @property
    def chunk_costs(self) -> list[int]:
        return [c.value.data for c in self.cost.data]

    def verify_(self) -> None:
        ranks, placement = self.int_prop("ranks"), self.chunk_ranks
        self.expect(ranks >= 2, f"ranks must be at least 2 (got {ranks})")
        self.expect(self.int_prop("microbatches") >= 1, "microbatches must be at least 1")
        self.expect(len(placement) % ranks == 0, f"{len(placement)} chunks do not divide over {ranks} ranks")
        per_rank = len(placement) // ranks
        for rank in range(ranks):
            self.expect(placement.count(rank) == per_rank, f"rank {rank} holds {placement.count(rank)} chunks, "
                        f"not {per_rank} as every rank must")
        self.expect(len(self.chunk_costs) == len(placement), "cost needs one entry per chunk of placement")


PIPELINE_OPS = [PipelineOp]
PIPELINE_ATTRS = [PipelineScheduleAttr]


def split_main_model(block: Block) -> tuple[list[LayerStackOp], list[Operation], list[Operation]]:
    """The main model's layer stacks in order, the ops before the first (chunk 0's: the embedding) and after the
    last (the last chunk's: head, losses, MTP modules). Between two stacks only parameter declarations may stand, and
    each stack must take the previous one's hidden state: a pipeline stage boundary can then fall between any two
    layers (the pipeline lowering skips those constraints: the layers' own keep the hidden state placed). Raises
    ValueError otherwise."""
    mtp = mtp_ops(block)
    ops = list(block.ops)
    stacks = [o for o in ops if isinstance(o, LayerStackOp) and o not in mtp]
    if not stacks:
        raise ValueError("the model has no layer stack to cut into stages")
    first, last = ops.index(stacks[0]), ops.index(stacks[-1])
    for op in ops[first:last]:
        if not isinstance(op, LayerStackOp | ParamOp | ShardOp):
            raise ValueError(f"'{op.name}' stands between two layer stacks: only parameters and sharding "
                             "constraints may")
    for before, after in zip(stacks, stacks[1:], strict=False):
        hidden = after.operands[0]
        while isinstance(hidden.owner, ShardOp):  # a constraint on the hidden state between the stacks
            hidden = hidden.owner.operands[0]
        if hidden != before.results[0]:
            raise ValueError("a layer stack does not take the previous stack's hidden state")
    return stacks, ops[:first], ops[last + 1:]
