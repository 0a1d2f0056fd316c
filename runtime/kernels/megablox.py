"""Routed-expert grouped GEMMs as Pallas megablox kernels (TPU): a `GroupedGemm` like `lax.ragged_dot`.

Megablox's `gmm` computes each group's rows against its weight matrix in [tm, tk] x [tk, tn] tiles and has a custom
VJP (`gmm` with the weights transposed for d(rows), `tgmm` for d(weights)). Its constraints, and how they are met:

- rows must be a whole number of m-tiles: rows are padded with zeros at the end (beyond every group);
- the k and n tiles must each fit both K and N, since the backward pass swaps their roles: K and N are padded with
  zeros to multiples of 128 lanes and one tile size dividing both is used for k and n;
- only bfloat16 and float32 operands;
- rows past sum(group_sizes) are never written by the kernel (its output there is uninitialised memory, and so is
  d(rows)): they are zeroed on the way in and on the way out, so the output and the gradient are zero there, as
  with `lax.ragged_dot`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import gmm

LANES = 128
"""K and N are padded to multiples of this (the TPU vector lane count)."""

TILES = (512, 256, 128)
"""Tile sizes tried in turn, largest first."""


def tiling(rows: int, groups: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for `rows` rows (a multiple of tm after padding) and K, N multiples of `LANES`.

    Every group with rows costs whole m-tiles (a group starting or ending inside a tile recomputes it), so tm is the
    largest tile not above the mean group size: with many experts per device (DeepSeek-V3: 256) and few rows each,
    a 512-row tile would mostly multiply rows of other groups. tk = tn: the largest tile dividing both K and N."""
    mean = rows // max(groups, 1)
    tm = next((t for t in TILES if t <= mean), TILES[-1])
    tkn = next(t for t in TILES if k % t == 0 and n % t == 0)
    return tm, tkn, tkn


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def megablox_gmm(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """`lax.ragged_dot(rows, weights, group_sizes)` through megablox: rows [T, K] sorted by group, weights [G, K, N],
    group sizes [G] (any integer dtype) -> [T, N] in the rows' dtype (bfloat16 or float32; accumulation in float32);
    zero for rows past sum(group_sizes). Differentiable in rows and weights. `interpret` runs the kernels in Pallas's
    interpreter (any backend)."""
    num_rows, k = rows.shape
    groups, _, n = weights.shape
    group_sizes = group_sizes.astype(jnp.int32)
    kp, np_ = _round_up(k, LANES), _round_up(n, LANES)
    tm, tk, tn = tiling(num_rows, groups, kp, np_)
    mp = _round_up(num_rows, tm)
    valid = (jnp.arange(mp) < jnp.sum(group_sizes))[:, None]
    lhs = jnp.where(valid, jnp.pad(rows, ((0, mp - num_rows), (0, kp - k))), 0)
    rhs = jnp.pad(weights.astype(rows.dtype), ((0, 0), (0, kp - k), (0, np_ - n)))
    out = gmm(lhs, rhs, group_sizes, preferred_element_type=rows.dtype, tiling=(tm, tk, tn), interpret=interpret)
    return jnp.where(valid, out, 0)[:num_rows, :n]
