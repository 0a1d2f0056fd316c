"""Lowering of the general tensor ops: token windows, embedding, matmul, reshapes, elementwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from ...dialects.sharding import BATCH_AXES
from .dtypes import result_dtype
from .registry import LoweringContext, kernel_impl, register_kernel, register_lowering
from .weights import cast_weight


def token_window(tokens: jax.Array, offset: int) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] -> (tokens[:, offset:offset+T-1] zero-padded past the end, float mask of valid entries). A token
    written as -(id + 1) starts a document: its id is `id`, and position i is masked when a document starts in
    (i, i + offset], where the target would be predicted across the boundary."""
    batch, total = tokens.shape
    length = total - 1
    starts = tokens < 0
    ids = jnp.pad(jnp.where(starts, -tokens - 1, tokens), ((0, 0), (0, offset)))[:, offset : offset + length]
    mask = jnp.broadcast_to(jnp.arange(length) + offset < total, (batch, length))
    if offset:
        seen = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # document starts in [0, j]
        # zero-padded (an edge pad slices the batch dimension, which explicit sharding refuses): the positions it
        # reaches run past the end and are masked already
        ahead = jnp.pad(seen, ((0, 0), (0, offset)))[:, offset : offset + length]
        mask = mask & (ahead == seen[:, :length])
    return ids, mask.astype(jnp.float32)


@register_lowering(dsv3.TokenWindowOp)
def _token_window(op: dsv3.TokenWindowOp, args, ctx):
    return token_window(args[0], op.int_prop("offset"))


@register_lowering(dsv3.PositionsOp)
def _positions(op, args, ctx):
    batch, length = args[0].shape
    return [jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))]


@register_lowering(dsv3.EmbedOp)
def _embed(op: dsv3.EmbedOp, args, ctx: LoweringContext):
    table, ids = args
    if ctx.explicit and ctx.mesh is not None:
        # explicit axes: a lookup in a vocab-sharded table must say how its result is laid out (batch-split)
        axes = tuple(a for a in BATCH_AXES if ctx.mesh.shape.get(a, 1) > 1)
        out = PartitionSpec(axes or None, None, None)
        return [table.at[ids].get(out_sharding=out).astype(result_dtype(op.result))]
    return [jnp.take(table, ids, axis=0).astype(result_dtype(op.result))]


def explicit_spec(value: jax.Array) -> tuple:
    """The explicit-axis partition spec of a traced value, one entry per dimension."""
    spec = tuple(jax.typeof(value).sharding.spec)
    return spec + (None,) * (value.ndim - len(spec))


@register_lowering(dsv3.MatmulOp)
def _matmul(op: dsv3.MatmulOp, args, ctx: LoweringContext):
    x, w = args
    w = cast_weight(op.operands[1], w, x.dtype, ctx)
    out = result_dtype(op.result)
    accumulate = jnp.promote_types(x.dtype, out)
    if ctx.explicit and ctx.mesh is not None:
        # a contraction over a tensor-sharded dimension is ambiguous in explicit mode: the result keeps x's leading
        # layout and w's output-dimension layout (so row-parallel layers end in a reduction). The plain form only:
        # a kernel's custom VJP would have to type every product of its backward pass the same way.
        layout = PartitionSpec(*explicit_spec(x)[:-1], explicit_spec(w)[-1])
        y = jnp.matmul(x, w, preferred_element_type=accumulate, out_sharding=layout)
    else:
        y = kernel_impl(op, Kernel.XLA)(x, w, accumulate)
    return [y.astype(out)]


@register_kernel(dsv3.MatmulOp, Kernel.XLA)
def _plain_matmul(x: jax.Array, w: jax.Array, accumulate: jnp.dtype) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=accumulate)


@register_lowering(dsv3.TransposeOp)
def _transpose(op, args, ctx):
    return [args[0].T]


@register_lowering(dsv3.SplitHeadsOp)
def _split_heads(op: dsv3.SplitHeadsOp, args, ctx):
    x = args[0]
    heads = op.int_prop("heads")
    return [x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)]


@register_lowering(dsv3.MergeHeadsOp)
def _merge_heads(op, args, ctx):
    x = args[0]
    return [x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])]


@register_lowering(dsv3.SliceOp)
def _slice(op: dsv3.SliceOp, args, ctx):
    start, size = op.int_prop("start"), op.int_prop("size")
    return [args[0][..., start : start + size]]


@register_lowering(dsv3.ConcatOp)
def _concat(op, args, ctx):
    return [jnp.concatenate(args, axis=-1)]


@register_lowering(dsv3.AddOp)
def _add(op, args, ctx):
    return [args[0] + args[1]]


@register_lowering(dsv3.SumOp)
def _sum(op, args, ctx):
    return [jnp.sum(args[0].astype(jnp.float32))]


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, with the sigmoid in float32."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


@register_lowering(dsv3.SwiGLUOp)
def _swiglu(op, args, ctx):
    return [swiglu(*args)]
