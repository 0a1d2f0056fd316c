"""Lowering of rotary position embeddings, with YaRN frequency interpolation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ...dialects import dsv3
from .registry import register_lowering


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(
    dim: int,
    theta: float,
    yarn_factor: float | None = None,
    original_len: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """Inverse frequencies [dim/2]. With YaRN, low frequencies (long wavelengths) are divided by the factor,
    high ones kept, with a linear ramp between the correction dimensions of beta_fast and beta_slow."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn_factor is None:
        return inv_freq.astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv_freq = inv_freq / yarn_factor * (1.0 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, layout: dsv3.RopeLayout, scale: float = 1.0
):
    """Rotates the last axis of x [B, S, ..., d] by positions [B, S]; cos/sin are multiplied by `scale`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, d/2]
    angles = angles.reshape(*angles.shape[:2], *([1] * (x.ndim - 3)), angles.shape[-1])
    cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
    x32 = x.astype(jnp.float32)
    if layout == dsv3.RopeLayout.INTERLEAVED:
        even, odd = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        a, b = x32[..., :half], x32[..., half:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.astype(x.dtype)


@register_lowering(dsv3.RopeOp)
def _rope(op: dsv3.RopeOp, args, ctx):
    x, positions = args
    factor = op.opt_float_prop("yarn_factor")
    scale = 1.0
    if factor is None:
        inv_freq = rope_frequencies(x.shape[-1], op.float_prop("theta"))
    else:
        inv_freq = rope_frequencies(
            x.shape[-1], op.float_prop("theta"), factor, op.int_prop("yarn_original_len"),
            op.opt_float_prop("yarn_beta_fast") or 32.0, op.opt_float_prop("yarn_beta_slow") or 1.0,
        )
        mscale, mscale_all_dim = op.opt_float_prop("yarn_mscale"), op.opt_float_prop("yarn_mscale_all_dim")
        if mscale and mscale_all_dim:
            scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:  # as HF transformers: without both, cos/sin carry the plain YaRN attention factor
            scale = _yarn_mscale(factor, 1.0)
    return [apply_rope(x, positions, inv_freq, op.layout.data, scale)]
