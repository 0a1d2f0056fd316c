"""The MLA attention core through `jax.nn.dot_product_attention`: cuDNN's fused flash attention on NVIDIA GPUs.

`dot_product_attention` wants one head width for queries, keys and values; MLA has 192-wide queries and keys (128
un-rotated + 64 rotated) and 128-wide values. The values are zero-padded to the key width and the padding sliced off
the output: zero columns of V only add zero columns to the result (and zero columns of Q and K, where the values
are the wider, add nothing to the scores), so nothing else changes (MaxText does the same
for cuDNN). cuDNN runs in 16-bit floats only; float32 inputs take the plain XLA form instead of being silently
rounded. cuDNN's attention carries its own sharding rule, so it needs no `shard_map` on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..lower.attention import mla_attention

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale: float, *, implementation: str = "cudnn") -> jax.Array:
    """`mla_attention` (causal, S == T) as one fused attention call. `implementation="xla"` runs the same call
    through XLA (what the tests compare on a CPU)."""
    if implementation == "cudnn" and q_nope.dtype not in _CUDNN_DTYPES:
        return mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale)
    heads = q_nope.shape[2]
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k_rope = jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], heads, k_pe.shape[-1]))
    k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
    width = max(k.shape[-1], v.shape[-1])  # zero columns change neither q . k nor the columns of p . v kept
    q, k, v_wide = (jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1]))) for a in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v_wide.astype(q.dtype), scale=scale, is_causal=True, implementation=implementation
    )
    return out[..., : v.shape[-1]].astype(v.dtype)
