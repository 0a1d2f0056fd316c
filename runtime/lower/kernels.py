"""Kernel rules: how each op with a `kernel` attribute calls the kernel it names (`runtime/kernels/`).

One function per (op, kernel). The kernel modules are imported when a rule first runs, so that a CPU compile never
loads the Pallas TPU machinery. Pallas kernels cannot be partitioned by XLA's automatic sharding, so on a mesh they
run under `shard_map` with the layout the default sharding rules give the operands: the batch split over the batch
axes, attention heads over `tensor`.
"""

from __future__ import annotations

import jax

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from ...dialects.sharding import BATCH_AXES
from .registry import LoweringContext, register_kernel


def _batch_axes(ctx: LoweringContext) -> tuple[str, ...]:
    assert ctx.mesh is not None
    return tuple(a for a in BATCH_AXES if ctx.mesh.shape.get(a, 1) > 1)


@register_kernel(dsv3.AttentionOp, Kernel.BLOCKWISE)
def _blockwise(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.blockwise_attention import blockwise_attention

    return blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, scale)


@register_kernel(dsv3.AttentionOp, Kernel.SPLASH)
def _splash(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.splash import sharded_splash_attention, splash_mla_attention

    if ctx.mesh is None:
        return splash_mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale)
    heads = "tensor" if ctx.mesh.shape.get("tensor", 1) > 1 else None
    return sharded_splash_attention(q_nope, q_pe, k_nope, k_pe, v, scale, ctx.mesh, _batch_axes(ctx), heads)


@register_kernel(dsv3.AttentionOp, Kernel.CUDNN)
def _cudnn(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.cudnn_attention import cudnn_mla_attention

    return cudnn_mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale)


@register_kernel(dsv3.ExpertsOp, Kernel.MEGABLOX)
def _megablox(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from ..kernels.megablox import megablox_gmm

    return megablox_gmm(rows, weights, group_sizes)
