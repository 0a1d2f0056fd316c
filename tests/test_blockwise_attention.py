"""The blockwise attention kernel against the plain lowering `mla_attention`: outputs and all five input gradients.

The shapes are tiny but chosen so that the tiling's corner cases occur: sequences that are and are not multiples of
the tiles, a key prefix longer than the queries (T > S, a KV cache), query tiles taller and shorter than key tiles
(so the causal diagonal cuts tiles in both directions). Each case is one jit compile of both forms' forward and
pullback together (compiling dominates this file's time), and the inputs come from NumPy, which compiles nothing.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3c.runtime.kernels.blockwise_attention import blockwise_attention, default_blocks
from dsv3c.runtime.lower.attention import mla_attention

HEADS, NOPE, ROPE, V_DIM = 3, 8, 4, 6
SCALE = (NOPE + ROPE) ** -0.5
NAMES = ("out", "d_q_nope", "d_q_pe", "d_k_nope", "d_k_pe", "d_v")


def _inputs(batch: int, s: int, t: int, dtype) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """(q_nope, q_pe, k_nope, k_pe, v) and an output cotangent, standard normal, in `dtype`."""
    rng = np.random.default_rng(s * 1000 + t)
    shapes = [(batch, s, HEADS, NOPE), (batch, s, HEADS, ROPE), (batch, t, HEADS, NOPE), (batch, t, ROPE),
              (batch, t, HEADS, V_DIM), (batch, s, HEADS, V_DIM)]
    arrays = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]
    return tuple(arrays[:5]), arrays[5]


@partial(jax.jit, static_argnames=("block_q", "block_k"))
def _both(operands, cotangent, *, block_q: int | None, block_k: int | None):
    """Output and input cotangents of the plain and the blockwise form, in one compiled program."""

    def outputs_and_grads(attention):
        out, pullback = jax.vjp(attention, *operands)
        return (out, *pullback(cotangent))

    plain = outputs_and_grads(partial(mla_attention, scale=SCALE))
    blockwise = outputs_and_grads(partial(blockwise_attention, scale=SCALE, block_q=block_q, block_k=block_k))
    return plain, blockwise


@pytest.mark.parametrize(
    ("batch", "s", "t", "block_q", "block_k"),
    [
        (2, 32, 48, 8, 16),  # divisible, T > S (a cached prefix); wide key tiles
        (1, 37, 45, 16, 8),  # neither divisible, T > S; tall query tiles
        (1, 256, 256, None, None),  # the default tiles: four query blocks of 64 rows, key blocks of 64
    ],
)
def test_float32_matches_plain(batch: int, s: int, t: int, block_q: int | None, block_k: int | None) -> None:
    operands, cotangent = _inputs(batch, s, t, jnp.float32)
    plain, blockwise = _both(operands, cotangent, block_q=block_q, block_k=block_k)
    for name, want, got in zip(NAMES, plain, blockwise, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_matches_plain() -> None:
    """bfloat16 operands, tiles of neither size dividing S or T: both forms round probabilities and cotangents to
    bfloat16 before their GEMMs, but at different points (the plain form after normalising, the blockwise form
    per tile, before), so they agree to a couple of bfloat16 ulps of the largest entry. Tolerance: 2% of each
    result's largest magnitude (measured: at most 0.8%; either form against float32 arithmetic on the same
    rounded inputs: at most 0.5%)."""
    operands, cotangent = _inputs(2, 29, 50, jnp.bfloat16)
    plain, blockwise = _both(operands, cotangent, block_q=8, block_k=16)
    for name, want, got in zip(NAMES, plain, blockwise, strict=True):
        assert got.shape == want.shape and got.dtype == jnp.bfloat16, name
        want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max(), err_msg=name)


def test_default_tiles_give_short_sequences_about_four_query_blocks() -> None:
    """Short sequences get small tiles (so the causal skip has tiles to skip), long ones 256 x 128."""
    assert [default_blocks(s) for s in (16, 256, 512, 1024, 8192)] == [(64, 64), (64, 64), (128, 64), (256, 128),
                                                                        (256, 128)]


def test_rejects_fewer_keys_than_queries() -> None:
    operands, _ = _inputs(1, 8, 4, jnp.float32)
    with pytest.raises(ValueError, match="must cover the queries"):
        blockwise_attention(*operands, SCALE)
