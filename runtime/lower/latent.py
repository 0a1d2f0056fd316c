"""Lowering of the inference attention forms: `dsv3.einsum`, the absorbed latent attention core, and the naive core
with a position mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ...dialects.latent import EinsumOp, LatentAttentionOp, MaskedAttentionOp
from .dtypes import result_dtype
from .registry import register_lowering

# A large finite negative rather than -inf: a query with no visible key (a padding row) then gets a uniform average
# instead of NaN, which would otherwise spread through the batch's MoE dispatch.
_MASKED = -1e30


@register_lowering(EinsumOp)
def _einsum(op: EinsumOp, args, ctx):
    a, b = args
    out = result_dtype(op.result)
    y = jnp.einsum(op.equation.data, a, b.astype(a.dtype), preferred_element_type=jnp.promote_types(a.dtype, out))
    return [y.astype(out)]


def _einsum_f32(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated in float32. XLA:CPU runs a dot that its YNNPACK fusion declines (a batched one whose
    contraction is not an operand's minor dimension, as probs . c_kv over keys at batch >= 2) with DotThunk, which
    has no bf16 x bf16 -> f32 kernel; so on CPU the operands are upcast first. That is the same arithmetic (a product
    of two bf16 values is exact in f32, and the sum is in f32 either way); other platforms keep bf16 operands."""
    f32 = jnp.float32

    def upcast(a, b):
        return jnp.einsum(equation, a.astype(f32), b.astype(f32))

    def mixed(a, b):
        return jnp.einsum(equation, a, b, preferred_element_type=f32)

    if a.dtype == f32 and b.dtype == f32:
        return mixed(a, b)
    return lax.platform_dependent(a, b, cpu=upcast, default=mixed)


def position_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, 1, S, T]: key t is visible to query s when 0 <= k_pos[t] <= q_pos[s] (negative: empty or padding)."""
    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    return visible[:, None]


def _softmax(scores: jax.Array, scale: float, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    scores = jnp.where(position_mask(q_pos, k_pos), scores * scale, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


def latent_attention(q_lat, q_pe, c_kv, k_pe, q_pos, k_pos, scale: float) -> jax.Array:
    """softmax((q_lat . c_kv + q_pe . k_pe) * scale) . c_kv per head; scores and softmax in float32."""
    scores = _einsum_f32("bshc,btc->bhst", q_lat, c_kv.astype(q_lat.dtype))
    scores = scores + _einsum_f32("bshr,btr->bhst", q_pe, k_pe.astype(q_pe.dtype))
    probs = _softmax(scores, scale, q_pos, k_pos)
    out = _einsum_f32("bhst,btc->bshc", probs.astype(c_kv.dtype), c_kv)
    return out.astype(q_lat.dtype)


def masked_attention(q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos, scale: float) -> jax.Array:
    """The naive core of `attention.mla_attention`, with the mask taken from positions instead of indices."""
    scores = _einsum_f32("bshd,bthd->bhst", q_nope, k_nope.astype(q_nope.dtype))
    scores = scores + _einsum_f32("bshr,btr->bhst", q_pe, k_pe.astype(q_pe.dtype))
    probs = _softmax(scores, scale, q_pos, k_pos)
    return _einsum_f32("bhst,bthd->bshd", probs.astype(v.dtype), v).astype(q_nope.dtype)


@register_lowering(LatentAttentionOp)
def _latent_attention(op: LatentAttentionOp, args, ctx):
    return [latent_attention(*args, op.float_prop("scale"))]


@register_lowering(MaskedAttentionOp)
def _masked_attention(op: MaskedAttentionOp, args, ctx):
    return [masked_attention(*args, op.float_prop("scale"))]
