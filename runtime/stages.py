"""Where a pipelined module's layers live: each layer stack's parameters stacked by rank along the `pipe` axis.

`dsv3-pipeline` writes, on each main-model layer stack, how many of its layers each chunk takes (`chunks`) and, in
`dsv3.pipeline`, which rank holds each chunk. A parameter stacked over a stack's layers, [count, ...] in the IR, is
held by a pipelined program as [ranks, rows, ...], split over `pipe` on its first axis, so each rank keeps only its
own chunks' layers. A rank's rows hold its local chunks one after another, each in a band as wide as the most layers
that chunk position takes on any rank (`width`): every rank then finds its k-th chunk at the same rows, which lets one
SPMD program slice it statically, and a rank whose chunk is shorter leaves the end of the band empty (zeros, never
read: `count` says how many rows are live). `stage_params` and `unstage_params` convert between the IR's layout and
this one, so checkpoints, imports and the unpipelined reference keep the IR's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from xdsl.dialects.builtin import ModuleOp

from ..dialects import dsv3
from ..dialects.pipeline import PipelineOp, split_main_model
from ..dialects.sharding import BATCH_AXES
from ..frontend.errors import UserError
from .model import model_func
from .pipeline_ticks import local_chunk
from .schedules import Schedule, build_schedule

PIPE_AXIS = "pipe"


@dataclass(frozen=True)
class StackStages:
    """One layer stack's layers across the chunks, and its parameters' rows on each rank."""

    op: dsv3.LayerStackOp
    params: tuple[str, ...]  # the stacked parameters, in operand order
    count: int
    layers: tuple[int, ...]  # per chunk, how many of the stack's layers it runs
    first: tuple[int, ...]  # per chunk, the stack index of its first layer
    width: tuple[int, ...]  # per local chunk position, its band's rows
    offset: tuple[int, ...]  # per local chunk position, its band's first row

    @property
    def rows(self) -> int:
        return sum(self.width)


@dataclass(frozen=True)
class StageLayout:
    """The pipeline of a module: its schedule, and for each main-model stack the rows of each rank."""

    pipeline: PipelineOp
    schedule: Schedule
    stacks: tuple[StackStages, ...]

    @property
    def ranks(self) -> int:
        return self.schedule.ranks

    @property
    def local_chunks(self) -> int:
        return self.schedule.num_chunks // self.ranks

    def chunk(self, rank: int, local: int) -> int:
        return self.schedule.chunks_of(rank)[local]

    def staged_names(self) -> set[str]:
        return {name for stack in self.stacks for name in stack.params}

    def stage_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The IR's layout -> the pipelined one (works on arrays and under a trace)."""
        return self._conversions[0](params)

    def unstage_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The pipelined layout -> the IR's."""
        return self._conversions[1](params)

    @cached_property
    def _conversions(self) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], ...]:
        """Both conversions, jitted: run eagerly, every slice, pad and concatenate of every parameter would be
        compiled on its own (about a hundred small programs for `tiny`); under a trace the jit is inlined."""
        return (jax.jit(lambda params: self._convert(params, self._stage)),
                jax.jit(lambda params: self._convert(params, self._unstage)))

    def _convert(self, params: dict[str, Any], convert: Callable[[StackStages, Any], Any]) -> dict[str, Any]:
        """`params` with each stacked parameter converted by `convert(stack, value)`, the others as they are."""
        out = dict(params)
        for stack in self.stacks:
            for name in stack.params:
                if name in params:
                    out[name] = convert(stack, params[name])
        return out

    def staged_sharding(self, name: str, sharding: NamedSharding) -> NamedSharding:
        """A stacked parameter's sharding in the pipelined layout: over `pipe` first, then as the IR says."""
        if name not in self.staged_names():
            return sharding
        return NamedSharding(sharding.mesh, PartitionSpec(PIPE_AXIS, *sharding.spec))

    def _unstage(self, stack: StackStages, value: Any) -> Any:
        return jnp.concatenate([
            value[self.schedule.placement[c], stack.offset[local_chunk(self.schedule, c)]:][:stack.layers[c]]
            for c in range(self.schedule.num_chunks)
        ])

    def _stage(self, stack: StackStages, value: Any) -> Any:
        ranks = []
        for rank in range(self.ranks):
            bands = []
            for local in range(self.local_chunks):
                c = self.chunk(rank, local)
                rows = value[stack.first[c]:stack.first[c] + stack.layers[c]]
                pad = stack.width[local] - stack.layers[c]
                bands.append(jnp.pad(rows, [(0, pad)] + [(0, 0)] * (value.ndim - 1)) if pad else rows)
            ranks.append(jnp.concatenate(bands))
        return jnp.stack(ranks)


def pipeline_op(module: ModuleOp) -> PipelineOp | None:
    return next((op for op in module.ops if isinstance(op, PipelineOp)), None)


def stage_layout(module: ModuleOp) -> StageLayout | None:
    """The module's stage layout, or None when it is not pipelined."""
    op = pipeline_op(module)
    if op is None:
        return None
    ranks = op.int_prop("ranks")
    placement = op.chunk_ranks
    schedule = build_schedule(op.schedule.data, ranks, op.int_prop("microbatches"), len(placement) // ranks)
    if tuple(placement) != schedule.placement:
        raise UserError(f"dsv3.pipeline: placement {placement} is not {op.schedule.data}'s "
                        f"{list(schedule.placement)}")
    try:
        stacks, _, _ = split_main_model(model_func(module).body.block)
    except ValueError as err:
        raise UserError(f"dsv3.pipeline: {err}") from None
    layouts = []
    for stack in stacks:
        layers = stack.chunk_layers
        if layers is None or len(layers) != len(placement):
            raise UserError(f"a layer stack of {stack.int_prop('count')} layers has no `chunks` for the "
                            f"{len(placement)} chunks of dsv3.pipeline: run dsv3-pipeline")
        names = []
        for operand in stack.operands[1:]:
            owner = operand.owner
            if not isinstance(owner, dsv3.ParamOp):
                raise UserError(f"a pipelined layer stack takes '{owner.name}' where a stacked parameter is expected")
            names.append(owner.pname)
        first = tuple(int(x) for x in np.cumsum([0, *layers[:-1]]))
        width = tuple(max(layers[schedule.chunks_of(r)[k]] for r in range(ranks))
                      for k in range(len(placement) // ranks))
        offset = tuple(int(x) for x in np.cumsum([0, *width[:-1]]))
        layouts.append(StackStages(stack, tuple(names), stack.int_prop("count"), tuple(layers), first, width, offset))
    return StageLayout(op, schedule, tuple(layouts))


def check_pipeline(layout: StageLayout, mesh_sizes: dict[str, int], batch: int, explicit: bool) -> None:
    """Refuses, before anything is traced, a pipelined program its mesh or batch cannot run."""
    have = mesh_sizes.get(PIPE_AXIS, 1)
    if have != layout.ranks:
        raise UserError(f"the module is pipelined over {layout.ranks} ranks (dsv3.pipeline) but the mesh's "
                        f"'{PIPE_AXIS}' axis has {have}: add {PIPE_AXIS}={layout.ranks} to the mesh")
    microbatches = layout.schedule.microbatches
    if batch % microbatches:
        raise UserError(f"batch {batch} does not divide into the pipeline's {microbatches} micro-batches")
    ways = math.prod(mesh_sizes.get(axis, 1) for axis in BATCH_AXES)
    if batch and batch // microbatches % ways:
        raise UserError(f"a micro-batch of {batch // microbatches} sequences (batch {batch} over {microbatches} "
                        f"micro-batches) does not divide over the {ways} devices of the batch mesh axes: raise the "
                        "batch or lower microbatches")
    if explicit:
        raise UserError("a pipelined program needs shard mode auto (explicit axes are not supported with a pipe axis)")
