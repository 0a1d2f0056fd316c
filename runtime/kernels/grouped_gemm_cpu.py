"""Routed-expert grouped GEMMs at the routed size on XLA:CPU: a `GroupedGemm` like `lax.ragged_dot`.

XLA:CPU lowers `lax.ragged_dot` densely (every row through every expert, behind a mask): G times the work. Here
each group's rows (the rows come sorted by group) are cut into windows of `tile` rows from the group's first row:
a loop over the groups reads each group's weights out of the stack once, and an inner loop with a traced trip count,
ceil(size / tile), multiplies the group's windows by them, keeping the rows that are the group's own (a group's last
window runs into the next group's rows, which it leaves alone). That is the routed work plus at most one partly used
window per group, with no gather or scatter of rows. Measured (`benchmarks/grouped_gemm_cpu.py`, CPU time, forward
and forward + backward): 12-110x less than ragged_dot at T = 2k-8k rows and G = 16-256, f32 and bf16; 1.1-1.5x a
single dense GEMM of the routed size at G = 16, more with many small groups, where reading every expert's weights and
the per-window loop cost dominate. Group by group rather than one flat list of (group, window) items, because a copy
of the group's weights per window cost more than the loop nest: 11% of the SwiGLU experts' forward and backward at
4,096 rows over 16 experts (512 x 256), and the weight gradient is now carried through a group's windows and
written once instead of read and written per window.

Differentiation is a custom VJP of the same shape: d(rows) is the same loops with the weights contracted on their
output dimension, d(weights) sums each group's (window^T . d(out) window) products. A loop with a traced trip count
(a `while`) cannot be reverse-differentiated by JAX itself, hence the custom VJP.

With no more rows than groups (a decode step: batch x top-k rows), the loops give way to a per-row form: each row's
group's weights gathered and one batched product. Inside a layer scan the loops' weights operand is a copy of the
layer's whole expert stack, where XLA fuses the gather with the scan's slice and reads only the chosen experts'
weights: 9.7x less time for four rows over a three-layer [16, 512, 256] stack (`benchmarks/grouped_gemm_cpu.py
--decode 3x4x512x256x16`, one core), and batch-1 decoding of the peer model 2.5x faster on one core.

Rows past sum(group_sizes) belong to no group: their output and their gradient are zero, as with `lax.ragged_dot`.
Products take the rows' dtype as operands and accumulate in float32 (every product here is a plain 2-D GEMM, which
XLA:CPU hands to YNNPACK, whose bf16 x bf16 -> f32 GEMM runs about twice its f32 speed on a CPU with AVX512-BF16;
XLA:CPU's own DotThunk has no such kernel, but it only runs products that YNNPACK declines), and the result is cast to
the rows' dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from .packed_matmul import packed_transpose
from .slicing import dynamic_index, dynamic_slice

TILES = (256, 128, 64, 32, 16)
"""Tile sizes `tile_rows` chooses from, largest first."""


def tile_rows(num_rows: int, groups: int) -> int:
    """The largest tile not above half the mean group size (the smallest when groups are tinier than that): each
    group wastes up to one partly used window, so a tile near the mean group size would nearly double the work,
    while smaller tiles pay the loop's per-item cost more often. Measured best at 8192 rows over 16, 4096 over 64
    and 2048 over 256 groups."""
    half_mean = num_rows // max(2 * groups, 1)
    return next((t for t in TILES if t <= half_mean), TILES[-1])


def _group_rows(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(first row, one past the last row) of each group's rows, clipped to the rows that exist."""
    end = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]]), end


def _windows(start: jax.Array, end: jax.Array, group: jax.Array, tile: int) -> jax.Array:
    """How many windows of `tile` rows cover the group's rows."""
    return (end[group] - start[group] + tile - 1) // tile


def _window(start: jax.Array, end: jax.Array, group: jax.Array, index: jax.Array, tile: int):
    """(first row of the group's `index`-th window, [tile] mask of the rows in it that are the group's own)."""
    first = start[group] + index * tile
    return first, first + jnp.arange(tile, dtype=jnp.int32) < end[group]


def _per_row(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """No more rows than groups (a decode step): each row times its own group's weights, gathered. XLA fuses that
    gather with the layer scan's slice of the stacked weights, so only the chosen groups' weights are read; the group
    loop's operand would be a copy of every group's (see the module's docstring). Plain JAX, differentiated by JAX."""
    groups = weights.shape[0]
    _, end = _group_rows(group_sizes, rows.shape[0])
    group = jnp.searchsorted(end, jnp.arange(rows.shape[0]), side="right")
    w = weights[jnp.minimum(group, groups - 1)].astype(jnp.float32)
    y = jnp.einsum("rk,rkn->rn", rows.astype(jnp.float32), w)  # batched GEMVs: DotThunk's, so float32 operands
    return jnp.where((group < groups)[:, None], y, 0).astype(rows.dtype)


def _pad_rows(x: jax.Array, tile: int) -> jax.Array:
    """A window may start on the last row: `tile` rows of zeros after it keep every window inside the array."""
    return jnp.pad(x, ((0, tile), (0, 0)))


def _apply(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tile: int, transpose: bool) -> jax.Array:
    """out[r] = rows[r] . W[g] (or . W[g]^T when `transpose`) for each row r of a group g; zero elsewhere.
    rows [T, K], weights [G, K, N] -> [T, N] (N, K swapped when `transpose`) in float32. Group by group: each
    group's weights are read out of the stack once, then its windows run."""
    num_rows = rows.shape[0]
    x = _pad_rows(rows, tile)
    width = weights.shape[1] if transpose else weights.shape[2]
    contract = 1 if transpose else 0
    start, end = _group_rows(group_sizes, num_rows)

    def group(g, out):
        w = dynamic_index(weights, g).astype(rows.dtype)

        def window(index, out):
            first, own = _window(start, end, g, index, tile)
            x_tile = dynamic_slice(x, first, tile)
            y = lax.dot_general(x_tile, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
            kept = jnp.where(own[:, None], y, lax.dynamic_slice_in_dim(out, first, tile))
            return lax.dynamic_update_slice_in_dim(out, kept, first, 0)

        return lax.fori_loop(0, _windows(start, end, g, tile), window, out)

    out = jnp.zeros((x.shape[0], width), jnp.float32)
    return lax.fori_loop(0, weights.shape[0], group, out)[:num_rows]


def _weight_grad(rows: jax.Array, d_out: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    """dW[g] = sum over rows r of group g of rows[r]^T d_out[r]: [G, K, N] in float32, each group's sum carried
    through its windows and written once. The rows are transposed once (`packed_transpose`: behind a barrier that
    keeps XLA from folding the transpose back into each window's product, and in a form where XLA keeps bf16 operands
    bf16): XLA:CPU's GEMM runs [K, tile] x [tile, N] faster than a product contracting both operands' major axis (a
    weight gradient over 4,096 rows in 16 groups, one core, interleaved calls: 16.4 against 19.4 ms at 512 x 256,
    15.7 against 15.5 at 256 x 512)."""
    x_t = packed_transpose(_pad_rows(rows, tile))
    dy = _pad_rows(d_out, tile)
    groups = group_sizes.shape[0]
    start, end = _group_rows(group_sizes, rows.shape[0])

    def group(g, dw):
        def window(index, total):
            first, own = _window(start, end, g, index, tile)
            x_tile = jnp.where(own[None, :], dynamic_slice(x_t, first, tile, axis=1), 0)
            d_tile = dynamic_slice(dy, first, tile).astype(x_tile.dtype)
            return total + jnp.matmul(x_tile, d_tile, preferred_element_type=jnp.float32)

        total = lax.fori_loop(0, _windows(start, end, g, tile), window, jnp.zeros(dw.shape[1:], jnp.float32))
        return lax.dynamic_update_index_in_dim(dw, total, g, 0)

    dw = jnp.zeros((groups, rows.shape[1], d_out.shape[1]), jnp.float32)
    return lax.fori_loop(0, groups, group, dw)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_gemm(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    """The forward loop, with a custom VJP because JAX cannot reverse-differentiate a loop of traced length."""
    return _apply(rows, weights, group_sizes, tile, transpose=False).astype(rows.dtype)


def _forward(
    rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tile: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Keeps only the operands: the backward loops find the groups' rows from the group sizes again."""
    return _grouped_gemm(rows, weights, group_sizes, tile), (rows, weights, group_sizes)


def _backward(
    tile: int, residuals: tuple[jax.Array, jax.Array, jax.Array], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, None]:
    """d(rows) and d(weights) at the routed size; group sizes are integers (no cotangent)."""
    rows, weights, group_sizes = residuals
    d_rows = _apply(d_out, weights, group_sizes, tile, transpose=True).astype(rows.dtype)
    d_weights = _weight_grad(rows, d_out, group_sizes, tile).astype(weights.dtype)
    return d_rows, d_weights, None


_grouped_gemm.defvjp(_forward, _backward)


def tiled_grouped_gemm(
    rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, *, tile: int | None = None
) -> jax.Array:
    """`lax.ragged_dot(rows, weights, group_sizes)` at the routed size: rows [T, K] sorted by group, weights
    [G, K, N], group sizes [G] (any integer dtype, traced) -> [T, N] in the rows' dtype, accumulated in float32;
    zero for rows past sum(group_sizes). Differentiable in rows and weights. `tile` (rows per work item) defaults to
    `tile_rows(T, G)`."""
    if rows.ndim != 2 or weights.ndim != 3 or rows.shape[1] != weights.shape[1]:
        raise ValueError(f"rows {rows.shape} and weights {weights.shape} are not [T, K] and [G, K, N]")
    if group_sizes.shape != (weights.shape[0],):
        raise ValueError(f"group sizes {group_sizes.shape} do not match {weights.shape[0]} groups")
    if rows.shape[0] <= weights.shape[0]:
        return _per_row(rows, weights, group_sizes)
    tile = tile or tile_rows(rows.shape[0], weights.shape[0])
    return _grouped_gemm(rows, weights, group_sizes, tile)
