"""Lowering of RMSNorm and the per-token gradient mask."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ...dialects import dsv3
from .registry import register_lowering


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


@register_lowering(dsv3.RMSNormOp)
def _rms_norm(op: dsv3.RMSNormOp, args, ctx):
    return [rms_norm(args[0], args[1], op.float_prop("eps"))]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_mask(x: jax.Array, threshold: float) -> jax.Array:
    """Identity; its gradient is zeroed for every token whose feature-axis gradient RMS exceeds `threshold`."""
    return x


def _grad_mask_fwd(x, threshold):
    return x, None


def _grad_mask_bwd(threshold, _, g):
    g32 = g.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(g32 * g32, axis=-1, keepdims=True))
    return (jnp.where(rms > threshold, jnp.zeros_like(g), g),)


grad_mask.defvjp(_grad_mask_fwd, _grad_mask_bwd)


@register_lowering(dsv3.GradMaskOp)
def _grad_mask(op: dsv3.GradMaskOp, args, ctx):
    return [grad_mask(args[0], op.float_prop("threshold"))]
