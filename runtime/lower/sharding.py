"""Lowering of sharding constraints: `dsv3.shard` becomes a constraint for XLA's partitioner (auto mode) or an
explicit `reshard` (explicit mode). Without a mesh (one device) it is the identity, so sharded IR still runs."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ...dialects.attributes import ShardingAttr
from ...dialects.sharding import MeshOp, ShardOp
from .registry import LoweringContext, register_lowering


def partition_spec(sharding: ShardingAttr) -> PartitionSpec:
    """`#dsv3.sharding<[{"data", "fsdp"}, {}]>` -> PartitionSpec(("data", "fsdp"), None)."""
    return PartitionSpec(*(axes if len(axes) > 1 else (axes[0] if axes else None) for axes in sharding.axes))


@register_lowering(ShardOp)
def _shard(op: ShardOp, args, ctx: LoweringContext):
    x = args[0]
    if ctx.mesh is None:
        return [x]
    spec = partition_spec(op.sharding)
    if ctx.explicit:
        return [jax.sharding.reshard(x, spec)]
    return [jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))]


@register_lowering(MeshOp)
def _mesh(op, args, ctx):
    return []
