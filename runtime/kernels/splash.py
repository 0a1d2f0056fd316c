"""The causal MLA attention core as Pallas splash attention (TPU), on one device or across a mesh.

The plain core (`lower.attention.mla_attention`) materialises float32 [B, H, S, S] scores for the backward pass;
splash attention is a flash-style kernel that keeps per-block statistics only (a [B, H, S, 128] float32
log-sum-exp), so attention temporaries grow as S instead of S^2.

MLA maps onto splash's multi-head form: queries are (q_nope | q_pe) with head dim n + r, keys (k_nope | k_pe) with
the one rope key broadcast over heads, values keep their own head dim (splash allows dv != dq). The softmax scale is
folded into the queries, as MaxText does. Splash needs sequence blocks that are multiples of the TPU's 128 lanes, so
a sequence that is not one is padded at its end: under a causal mask no real query sees a later (padded) key, and
the padded queries' outputs are sliced off (so their cotangents, and hence their gradient contributions, are zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh

from .per_device import per_device_attention

LANES = 128
"""Sequence blocks must be multiples of this (the TPU vector lane count)."""

BLOCKS = (512, 256, 128)
"""Block sizes tried in turn, largest first; 512 is MaxText's default for every splash block."""


def block_size(seq: int) -> int:
    """The largest of `BLOCKS` dividing `seq` (a multiple of `LANES`): one block size for every forward and
    backward kernel, so that a short sequence gets one block instead of a mostly masked 512."""
    return next(b for b in BLOCKS if seq % b == 0)


@functools.lru_cache(maxsize=16)
def _kernel(heads: int, seq: int, interpret: bool) -> splash.SplashAttentionKernel:
    """Causal splash kernel for [heads, seq, d] operands (the mask metadata is built once per shape)."""
    mask = splash.MultiHeadMask(tuple(splash.CausalMask((seq, seq)) for _ in range(heads)))
    b = block_size(seq)
    sizes = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale: float, *, interpret: bool = False) -> jax.Array:
    """`mla_attention` (causal) on one device's arrays through splash attention, forward and backward.

    q_nope, k_nope [B, S, H, n]; q_pe [B, S, H, r]; k_pe [B, S, r]; v [B, S, H, dv] -> [B, S, H, dv]. All of one
    float dtype (bfloat16 or float32): the scaled queries are rounded to it, where the plain core scales float32
    scores. S is padded to a multiple of 128. Keys and queries must have the same length: the plain core's offset
    causal mask for queries that continue a longer key sequence (a KV cache) is not supported. `interpret` runs the
    kernel in Pallas's interpreter (any backend)."""
    batch, seq, heads, _ = q_nope.shape
    if k_nope.shape[1] != seq:
        raise ValueError(f"splash attention needs as many keys as queries, got {k_nope.shape[1]} keys for {seq}")
    q = jnp.concatenate([q_nope, q_pe], axis=-1) * jnp.asarray(scale, q_nope.dtype)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (batch, seq, heads, k_pe.shape[-1]))], axis=-1)
    padded = -(-seq // LANES) * LANES

    def heads_major(x):  # [B, S, H, d] -> [B, H, S_padded, d]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - seq), (0, 0)))

    kernel = _kernel(heads, padded, interpret)
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))  # splash takes one batch element
    return out[:, :, :seq].transpose(0, 2, 1, 3)


def sharded_splash_attention(
    q_nope, q_pe, k_nope, k_pe, v, scale: float, mesh: Mesh, batch_axes: tuple[str, ...], head_axis: str | None,
    *, interpret: bool = False,
) -> jax.Array:
    """`splash_mla_attention` on a mesh, per device (see `per_device_attention`): a Pallas call is opaque to XLA's
    partitioner, so inside an auto-sharded jit it has to run under `shard_map`."""
    body = functools.partial(splash_mla_attention, scale=scale, interpret=interpret)
    return per_device_attention(body, (q_nope, q_pe, k_nope, k_pe, v), mesh, batch_axes, head_axis)
