"""Kernel rules: how each op with a `kernel` attribute calls the kernel it names (`runtime/kernels/`).

One function per (op, kernel). The kernel modules are imported when a rule first runs, so that a CPU compile never
loads the Pallas TPU machinery. Pallas kernels cannot be partitioned by XLA's automatic sharding, so on a mesh they
run under `shard_map` with the layout the default sharding rules give the operands: the batch split over the batch
axes, attention heads over `tensor` (so does the blockwise kernel, whose per-block concatenations explicit-axis
sharding could not type).
"""

from __future__ import annotations

import functools

import jax

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from ...dialects.sharding import BATCH_AXES
from .registry import LoweringContext, register_kernel


def _batch_axes(ctx: LoweringContext) -> tuple[str, ...]:
    assert ctx.mesh is not None
    return tuple(a for a in BATCH_AXES if ctx.mesh.shape.get(a, 1) > 1)


def _on_devices(kernel, args: tuple[jax.Array, ...], ctx: LoweringContext) -> jax.Array:
    """`kernel` on the whole arrays on one device, per device (`shard_map`) on a mesh."""
    if ctx.mesh is None:
        return kernel(*args)
    from ..kernels.per_device import per_device_attention

    heads = "tensor" if ctx.mesh.shape.get("tensor", 1) > 1 else None
    return per_device_attention(kernel, args, ctx.mesh, _batch_axes(ctx), heads)


@register_kernel(dsv3.AttentionOp, Kernel.BLOCKWISE)
def _blockwise(*args: jax.Array, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.blockwise_attention import blockwise_attention

    return _on_devices(functools.partial(blockwise_attention, scale=scale), args, ctx)


@register_kernel(dsv3.AttentionOp, Kernel.SPLASH)
def _splash(*args: jax.Array, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.splash import splash_mla_attention

    return _on_devices(functools.partial(splash_mla_attention, scale=scale), args, ctx)


@register_kernel(dsv3.AttentionOp, Kernel.CUDNN)
def _cudnn(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, ctx: LoweringContext) -> jax.Array:
    from ..kernels.cudnn_attention import cudnn_mla_attention

    return cudnn_mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale)


@register_kernel(dsv3.ExpertsOp, Kernel.TILED)
def _tiled(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from ..kernels.grouped_gemm_cpu import tiled_grouped_gemm

    return tiled_grouped_gemm(rows, weights, group_sizes)


@register_kernel(dsv3.ExpertsOp, Kernel.MEGABLOX)
def _megablox(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from ..kernels.megablox import megablox_gmm

    return megablox_gmm(rows, weights, group_sizes)


@register_kernel(dsv3.MatmulOp, Kernel.PACKED)
def _packed(x: jax.Array, w: jax.Array, accumulate) -> jax.Array:
    from ..kernels.packed_matmul import packed_matmul

    return packed_matmul(x, w, accumulate)
