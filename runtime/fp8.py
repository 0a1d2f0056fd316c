"""FP8 numerics: tile-wise quantisation and block-scaled GEMMs, natively or by exact emulation.

A GEMM with fine-grained scales cannot be one FP8 GEMM: the scales change along K. As DeepSeek-V3 does on its tensor
cores, the contraction is cut into K-blocks (the tile width, 128 by default); each block is an FP8 x FP8 GEMM
accumulated in FP32, multiplied by its row and column scales and added to an FP32 accumulator, block after block
in K order.

Three backends compute the per-block GEMMs:
- `native`: `dot_general` on FP8 operands with an FP32 result, which XLA:GPU compiles to FP8 tensor-core GEMMs
  (Hopper and later);
- `exact`: the same products summed exactly in float64 and rounded once to FP32, so the result is defined
  independently of any GEMM library's summation order and a NumPy reference reproduces it bit for bit. Products of
  two E4M3 values are multiples of 2^-18 below 2^17.7, so float64 holds any sum of up to 2^17 of them exactly; with
  E5M2 gradients (multiples of 2^-16 up to 57344) a block is exact unless its products span more than about 2^46.
  The CPU's emulation (float64 is cheap there);
- `emulate`: FP8 values widened to BF16 (exactly: both formats fit in it) and multiplied with FP32 accumulation,
  for accelerators without FP8 units or float64 (TPU), where the hardware's accumulation order applies;
- `pallas`: the fine-grained GEMMs (1 x 128 tiles against 128 x 128 or 128 x 1 blocks) as the block-scaled Pallas
  kernels of `runtime/kernels/fp8_gemm.py` (one Triton kernel per GEMM, the FP32 accumulator in registers: what
  XLA cannot fuse), everything else as `native`. Lowered for CUDA they are Triton kernels; lowered for any other
  platform they run in Pallas's interpreter (how the tests check this path on the CPU).

Everything here works on 2-D operands (callers flatten leading axes) and knows nothing of the IR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
MAX = {"e4m3": 448.0, "e5m2": 57344.0}
BACKENDS = ("native", "emulate", "exact", "pallas")
# Partial-product blocks computed in one batched GEMM before they are folded into the accumulator: bounds the
# FP32 temporaries of a long K (K/128 blocks of [M, N]) without giving up batching.
_PARTIALS_BYTES = 256 << 20
_MAX_UNROLL = 16


@dataclass(frozen=True)
class Tiling:
    """A quantisation recipe for one operand: FP8 format, tile `rows x cols` (0 = the whole axis) sharing a scale,
    and whether scales are rounded up to powers of two."""

    fmt: str = "e4m3"
    rows: int = 1
    cols: int = 128
    pow2: bool = False

    @property
    def per_tensor(self) -> bool:
        return self.rows == 0 and self.cols == 0

    def transposed(self) -> Tiling:
        return Tiling(self.fmt, self.cols, self.rows, self.pow2)

    def with_tile(self, rows: int, cols: int) -> Tiling:
        return Tiling(self.fmt, rows, cols, self.pow2)


# ---------------------------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------------------------


def _tile_dims(shape: tuple[int, int], t: Tiling) -> tuple[int, int]:
    rows, cols = shape
    return (t.rows or rows) or 1, (t.cols or cols) or 1


def _pad_to(x: jax.Array, rows: int, cols: int) -> jax.Array:
    pad_r, pad_c = -x.shape[0] % rows, -x.shape[1] % cols
    return jnp.pad(x, ((0, pad_r), (0, pad_c))) if pad_r or pad_c else x


def scales_for(amax: jax.Array, t: Tiling) -> jax.Array:
    """amax / FP8_MAX (or the next power of two above it), 1 for an all-zero tile.

    Written as amax * fl(1/FP8_MAX): XLA rewrites a division by a constant into that multiplication anyway, so
    spelling it out keeps the result the same on every backend and reproducible outside XLA."""
    scale = amax * jnp.float32(1.0 / MAX[t.fmt])
    if t.pow2:
        mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
        scale = jnp.ldexp(jnp.ones_like(scale), exponent - (mantissa == 0.5).astype(exponent.dtype))
    return jnp.where(amax > 0, scale, jnp.float32(1.0))


def quantize(x: jax.Array, t: Tiling) -> tuple[jax.Array, jax.Array]:
    """x [R, C] -> (FP8 values [R, C], f32 scales [ceil(R/rows), ceil(C/cols)]), values = x * fl(1/scale) rounded
    to nearest and clipped to the format's range (so amax lands on FP8_MAX, never beyond). The reciprocal is taken
    once per tile and multiplied, which is what XLA makes of a division by a broadcast scale."""
    rows, cols = x.shape
    tr, tc = _tile_dims(x.shape, t)
    tiles = _pad_to(x.astype(jnp.float32), tr, tc)
    tiles = tiles.reshape(tiles.shape[0] // tr, tr, tiles.shape[1] // tc, tc)
    scale = scales_for(jnp.max(jnp.abs(tiles), axis=(1, 3)), t)
    fmax = jnp.float32(MAX[t.fmt])
    inverse = jnp.float32(1.0) / scale
    values = jnp.clip(tiles * inverse[:, None, :, None], -fmax, fmax).astype(DTYPES[t.fmt])
    values = values.reshape(tiles.shape[0] * tr, tiles.shape[2] * tc)[:rows, :cols]
    return values, scale


def expand_scales(scales: jax.Array, shape: tuple[int, int], t: Tiling) -> jax.Array:
    """Per-tile scales [R/rows, C/cols] -> one per element [R, C]."""
    tr, tc = _tile_dims(shape, t)
    full = jnp.repeat(jnp.repeat(scales, tr, axis=0), tc, axis=1)
    return full[: shape[0], : shape[1]]


def dequantize(values: jax.Array, scales: jax.Array, t: Tiling) -> jax.Array:
    """values * scale per tile, in float32."""
    return values.astype(jnp.float32) * expand_scales(scales, values.shape, t)


# ---------------------------------------------------------------------------------------------------------------
# Block-scaled GEMMs
# ---------------------------------------------------------------------------------------------------------------


def _scaled_dot(spec: str, a: jax.Array, b: jax.Array, scale: jax.Array, backend: str) -> jax.Array:
    """`einsum(spec, a, b) * scale` for FP8 a and b and an f32 scale broadcast to the result, in f32.

    native: an FP8 GEMM with an FP32 result, scaled in its epilogue. emulate: the same on BF16 copies of the FP8
    values. exact: the block sum in float64 (exact, see the module docstring), multiplied by the scale in float64
    and rounded once to FP32. Fusing the scaling into the product also keeps XLA from contracting
    `acc + partial * scale` into an FMA, which would make the result depend on how the compiler fused it."""
    if backend in ("native", "pallas"):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) * scale
    if backend == "emulate":
        wide = jnp.bfloat16
        return jnp.einsum(spec, a.astype(wide), b.astype(wide), preferred_element_type=jnp.float32) * scale
    with jax.enable_x64(True):
        exact = jnp.einsum(spec, a.astype(jnp.float64), b.astype(jnp.float64))
        return (exact * scale.astype(jnp.float64)).astype(jnp.float32)


def _kernel_tiles(ta: Tiling, tb: Tiling) -> bool:
    """Whether the Pallas kernels take these tilings: 1 x 128 tiles on a, 128 x 128 or 128 x 1 blocks on b."""
    return (ta.rows, ta.cols, tb.rows) == (1, 128, 128) and tb.cols in (128, 1)


def _on_platform(name: str, *args, **options) -> jax.Array:
    """A call of the Pallas kernel `name` of `runtime/kernels/fp8_gemm.py`: the Triton kernel where the program is
    lowered for CUDA, Pallas's interpreter on other platforms (the same arithmetic, in XLA ops). Imported here, not
    at the top: the kernels module uses this one."""
    from .kernels import fp8_gemm

    kernel = getattr(fp8_gemm, name)
    return lax.platform_dependent(
        *args,
        cuda=lambda *a: kernel(*a, **options),
        default=lambda *a: kernel(*a, **options, interpret=True),
    )


def _chunk(blocks: int, out_elems: int) -> int:
    """How many K-blocks to multiply in one batched GEMM: all of them when their partials fit the budget."""
    fit = max(1, min(_MAX_UNROLL, _PARTIALS_BYTES // max(4 * out_elems, 1)))
    return max(d for d in range(1, min(blocks, fit) + 1) if blocks % d == 0)


def blocked_matmul(
    a: jax.Array, a_scales: jax.Array, ta: Tiling,
    b: jax.Array, b_scales: jax.Array, tb: Tiling,
    backend: str,
) -> jax.Array:
    """a [M, K] (FP8, `ta` tiles `1 x kb` or `tensor`) @ b [K, N] (FP8, `tb` tiles `kb x nb` or `tensor`) -> f32.

    Fine-grained: out = sum over K-blocks j, in order, of (a_j @ b_j) * (a_scale[:, j] * b_scale[j, :]), the
    block products in FP32, the running sum in FP32. Per-tensor: one GEMM, scaled once."""
    m, k = a.shape
    n = b.shape[1]
    if ta.per_tensor:
        return _scaled_dot("mk,kn->mn", a, b, a_scales[0, 0] * b_scales[0, 0], backend)
    if backend == "pallas" and _kernel_tiles(ta, tb):
        return _on_platform("block_scaled_matmul", a, a_scales, b, b_scales, out_dtype=jnp.float32,
                            b_block_n=tb.cols)
    kb = ta.cols or k
    if (tb.rows or k) != kb or ta.rows not in (1, 0):
        raise ValueError(f"block-scaled GEMM needs 1 x {kb} tiles on a and {kb} x n blocks on b ({ta}, {tb})")
    blocks = math.ceil(k / kb)
    a_blk = _pad_to(a, 1, kb).reshape(m, blocks, kb)
    b_blk = _pad_to(b, kb, 1).reshape(blocks, kb, n)
    a_sc = jnp.broadcast_to(a_scales, (m, blocks)) if ta.rows == 0 else a_scales  # [M, blocks]
    nb = tb.cols or n
    b_sc = jnp.repeat(b_scales, nb, axis=1)[:, :n]  # [blocks, N]
    chunk = _chunk(blocks, m * n)

    def fold(acc, a_c, b_c, a_s, b_s):
        scale = jnp.transpose(a_s)[:, :, None] * b_s[:, None, :]  # [chunk, M, N]: row scale x column scale
        partial = _scaled_dot("mcb,cbn->cmn", a_c, b_c, scale, backend)
        for j in range(a_c.shape[1]):  # K order, one FP32 add per block
            acc = acc + partial[j]
        return acc

    acc = jnp.zeros((m, n), jnp.float32)
    if chunk == blocks:
        return fold(acc, a_blk, b_blk, a_sc, b_sc)

    def body(i, acc):
        start = i * chunk
        return fold(
            acc,
            lax.dynamic_slice_in_dim(a_blk, start, chunk, axis=1),
            lax.dynamic_slice_in_dim(b_blk, start, chunk, axis=0),
            lax.dynamic_slice_in_dim(a_sc, start, chunk, axis=1),
            lax.dynamic_slice_in_dim(b_sc, start, chunk, axis=0),
        )

    return lax.fori_loop(0, blocks // chunk, body, acc)


def _scaled_ragged(a: jax.Array, b: jax.Array, group_sizes: jax.Array, scale: jax.Array, backend: str) -> jax.Array:
    """`ragged_dot(a, b, group_sizes) * scale`, like `_scaled_dot`."""
    if backend in ("native", "pallas"):
        return lax.ragged_dot(a, b, group_sizes, preferred_element_type=jnp.float32) * scale
    if backend == "emulate":
        wide = jnp.bfloat16
        return lax.ragged_dot(a.astype(wide), b.astype(wide), group_sizes, preferred_element_type=jnp.float32) * scale
    with jax.enable_x64(True):
        exact = lax.ragged_dot(a.astype(jnp.float64), b.astype(jnp.float64), group_sizes)
        return (exact * scale.astype(jnp.float64)).astype(jnp.float32)


def group_of_rows(group_sizes: jax.Array, rows: int) -> jax.Array:
    """For rows sorted by group, the group of each row (rows past the last group get the last group)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.minimum(jnp.searchsorted(ends, jnp.arange(rows), side="right"), group_sizes.shape[0] - 1)


def blocked_ragged_matmul(
    a: jax.Array, a_scales: jax.Array, ta: Tiling,
    b: jax.Array, b_scales: jax.Array, tb: Tiling,
    group_sizes: jax.Array, backend: str,
) -> jax.Array:
    """Grouped GEMM: rows of a [T, K] sorted by group, group g multiplied by b[g] [K, N]; b's scales are per group
    [G, K/kb, N/nb]. K-blocks are folded as in `blocked_matmul`."""
    t_rows, k = a.shape
    n = b.shape[2]
    group = group_of_rows(group_sizes, t_rows)
    if ta.per_tensor:
        return _scaled_ragged(a, b, group_sizes, (a_scales[0, 0] * b_scales[group, 0, 0])[:, None], backend)
    if backend == "pallas" and _kernel_tiles(ta, tb):
        return _on_platform("block_scaled_grouped_matmul", a, a_scales, b, b_scales, group_sizes,
                            out_dtype=jnp.float32, b_block_n=tb.cols)
    kb = ta.cols or k
    blocks = math.ceil(k / kb)
    a_blk = _pad_to(a, 1, kb)
    b_blk = jnp.pad(b, ((0, 0), (0, blocks * kb - k), (0, 0)))
    nb = tb.cols or n
    b_sc = jnp.repeat(b_scales, nb, axis=2)[:, :, :n]  # [G, blocks, N]
    acc = jnp.zeros((t_rows, n), jnp.float32)
    # One ragged GEMM per K-block; unrolled, since a model's K is a few blocks and each is a full grouped GEMM.
    for j in range(blocks):
        scale = a_scales[:, j, None] * b_sc[group, j, :]
        acc = acc + _scaled_ragged(
            a_blk[:, j * kb : (j + 1) * kb], b_blk[:, j * kb : (j + 1) * kb], group_sizes, scale, backend
        )
    return acc


def group_aligned_rows(group_sizes: jax.Array, rows: int, tile: int) -> tuple[jax.Array, jax.Array, int]:
    """Positions that pad every group of sorted rows to whole tiles: (destination of each row, group of each
    tile, number of padded rows). Tiles past the last group belong to the last group and hold only zeros."""
    groups = group_sizes.shape[0]
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    starts = jnp.cumsum(group_sizes) - group_sizes
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    group = group_of_rows(group_sizes, rows)
    dest = padded_starts[group] + jnp.arange(rows) - starts[group]
    total = math.ceil((rows + groups * (tile - 1)) / tile) * tile
    tiles = total // tile
    tile_group = group_of_rows(padded_sizes // tile, tiles)
    return dest, tile_group, total


def grouped_weight_grad(
    x: jax.Array, g: jax.Array, group_sizes: jax.Array, groups: int,
    tx: Tiling, tg: Tiling, backend: str,
) -> jax.Array:
    """dW[e] = x_e^T @ g_e for rows sorted by group: x [T, K], g [T, N] -> [G, K, N] f32, contracting over rows.

    Each group's rows are padded to whole `tile`-row tiles (`tx.rows`), so every tile belongs to one expert; x and
    g are quantised per `tile x 1` (per-tensor recipes: once), and each tile's FP8 GEMM is scaled and added to its
    expert's gradient, tile after tile."""
    rows, k = x.shape
    n = g.shape[1]
    if tx.per_tensor:
        xq, xs = quantize(x, tx)
        gq, gs = quantize(g, tg)
        onehot = jax.nn.one_hot(group_of_rows(group_sizes, rows), groups, dtype=jnp.float32)
        valid = (jnp.arange(rows) < jnp.sum(group_sizes)).astype(jnp.float32)[:, None]
        # per-tensor scales factor out of every sum: one FP8 GEMM per expert over its rows (masked)
        scale = xs[0, 0] * gs[0, 0]
        return jnp.stack([
            _scaled_dot("tk,tn->kn", (xq.astype(jnp.float32) * onehot[:, e, None] * valid).astype(xq.dtype), gq,
                        scale, backend)
            for e in range(groups)
        ])
    tile = tx.rows
    dest, tile_group, total = group_aligned_rows(group_sizes, rows, tile)
    valid = jnp.arange(rows) < jnp.sum(group_sizes)
    dest = jnp.where(valid, dest, total)  # rows beyond the groups are dropped
    x_pad = jnp.zeros((total, k), x.dtype).at[dest].set(x, mode="drop")
    g_pad = jnp.zeros((total, n), g.dtype).at[dest].set(g, mode="drop")
    xq, xs = quantize(x_pad, tx)  # [total, K], scales [tiles, K]
    gq, gs = quantize(g_pad, tg)  # [total, N], scales [tiles, N]
    tiles = total // tile
    if backend == "pallas" and (tx.rows, tx.cols, tg.rows, tg.cols) == (128, 1, 128, 1):
        return _on_platform("block_scaled_grouped_weight_grad", xq, xs, gq, gs, group_sizes,
                            out_dtype=jnp.float32)

    def body(i, acc):
        xt = lax.dynamic_slice_in_dim(xq, i * tile, tile, axis=0)
        gt = lax.dynamic_slice_in_dim(gq, i * tile, tile, axis=0)
        partial = _scaled_dot("tk,tn->kn", xt, gt, xs[i][:, None] * gs[i][None, :], backend)
        e = tile_group[i]
        return acc.at[e].set(acc[e] + partial)

    return lax.fori_loop(0, tiles, body, jnp.zeros((groups, k, n), jnp.float32))
