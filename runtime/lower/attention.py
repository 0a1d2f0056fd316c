"""Lowering of the causal MLA attention core (naive form: per-head keys and values): the plain XLA kernel here, the
others in `runtime/kernels/`, chosen by the op's `kernel` attribute."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from .registry import LoweringContext, kernel_impl, register_kernel, register_lowering


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale: float) -> jax.Array:
    """softmax((q_nope . k_nope + q_pe . k_pe) * scale) v with a causal mask; scores and softmax in float32."""
    f32 = jnp.float32
    scores = jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=f32)
    scores = scores + jnp.einsum("bshr,btr->bhst", q_pe, k_pe, preferred_element_type=f32)
    scores = scores * scale
    s, t = scores.shape[-2:]
    causal = jnp.arange(s)[:, None] + (t - s) >= jnp.arange(t)[None, :]
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v, preferred_element_type=f32).astype(v.dtype)


@register_kernel(dsv3.AttentionOp, Kernel.XLA)
def _xla_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, ctx: LoweringContext) -> jax.Array:
    return mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale)


@register_lowering(dsv3.AttentionOp)
def _attention(op: dsv3.AttentionOp, args, ctx: LoweringContext):
    return [kernel_impl(op, Kernel.XLA)(*args, scale=op.float_prop("scale"), ctx=ctx)]
