"""The Pallas block-scaled FP8 GEMM (`runtime/kernels/fp8_gemm.py`), run in Pallas's interpreter on the CPU, against
`runtime.fp8`'s whole-array block-scaled GEMMs: forward, dX and dW as `runtime.lower.fp8._linear_bwd` tiles them,
dense and grouped, with and without padding, and its refusals of bad operands.

What each reference is to the kernel, and so how closely they must agree (u = 2^-24, the FP32 unit roundoff;
S = sum over K of |a| * |b| dequantised, the natural scale of the rounding errors of a dot product):
- `native` (an FP8 dot per block, then partial * scale, then + acc): the kernel's per-block FP8 dot is the same
  computation on the CPU, but the interpreted kernel body promotes with one fused multiply-add per block
  (acc + partial * scale, rounded once: XLA:CPU contracts it, as Triton does on the GPU), while the reference rounds
  the product first (it keeps the scaling in the GEMM's epilogue precisely to avoid the contraction). So: bit for bit
  with power-of-two scales (the product is then exact and both orders agree), and bit for bit against a NumPy
  promotion with an FMA for any scales; otherwise within 4 * blocks * u * S.
- `exact` (each block summed exactly, rounded once): the kernel sums each 128-product block in FP32 in some order,
  so |kernel - exact| <= (BLOCK_K + 2 * blocks + 2) * u * S (the classical bound for a sum of BLOCK_K terms, plus
  one rounding per scale, promotion and accumulation on either side).
- `emulate` (BF16-widened FP8, FP32 accumulation): the same arithmetic as `native` but XLA:CPU's BF16 dot sums in
  another order than its FP8 dot, so it is held to the sum of both bounds above, 2 * (BLOCK_K + 2 * blocks + 2) * u * S.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3c.runtime import fp8
from dsv3c.runtime.kernels import fp8_gemm
from dsv3c.runtime.kernels.fp8_gemm import (
    BLOCK_K,
    block_scaled_grouped_matmul,
    block_scaled_grouped_weight_grad,
    block_scaled_matmul,
    block_scaled_matmul_dw,
    block_scaled_matmul_dx,
)
from dsv3c.runtime.lower.fp8 import Recipe

U = 2.0**-24

# The references, jitted: run eagerly, each of their jnp operations is compiled on its own (700 compiles, most of
# this file's time). Under jit they compute what the model's own jitted steps compute.
quantize = jax.jit(fp8.quantize, static_argnums=1)
dequantize = jax.jit(fp8.dequantize, static_argnums=2)
blocked_matmul = jax.jit(fp8.blocked_matmul, static_argnums=(2, 5, 6))
blocked_ragged_matmul = jax.jit(fp8.blocked_ragged_matmul, static_argnums=(2, 5, 7))
grouped_weight_grad = jax.jit(fp8.grouped_weight_grad, static_argnums=(3, 4, 5, 6))


def _recipe(pow2: bool, grad_fmt: str = "e4m3") -> Recipe:
    """DeepSeek-V3's recipe: activations per 1 x 128, weights per 128 x 128, gradients per 1 x 128."""
    return Recipe(
        fp8.Tiling("e4m3", 1, 128, pow2), fp8.Tiling("e4m3", 128, 128, pow2), fp8.Tiling(grad_fmt, 1, 128, pow2),
        "native", np.dtype(np.float32), np.dtype(np.float32), np.dtype(np.float32),
    )


def _normal(seed: int, *shape: int) -> jax.Array:
    # a spread of magnitudes across rows and columns, so that tiles get different scales
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[:-1] + (1,)))
    return jnp.asarray(x, jnp.float32)


def _abs_product(a, a_scales, ta, b, b_scales, tb) -> np.ndarray:
    """S = |dequantised a| @ |dequantised b| in float64: the scale of every rounding error of the GEMM."""
    a_d = np.abs(np.asarray(dequantize(a, a_scales, ta), np.float64))
    b_d = np.abs(np.asarray(dequantize(b, b_scales, tb), np.float64))
    return a_d @ b_d


def _error_in_units(ours, ref, s: np.ndarray) -> float:
    """max |ours - ref| / (u * S); an element with S = 0 must be equal (both zero)."""
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    assert np.all(diff[s == 0] == 0)
    return float(np.max(diff / np.where(s == 0, 1.0, U * s)))


def _fma_reference(a, a_scales, ta, b, b_scales, tb) -> np.ndarray:
    """The kernel's arithmetic in NumPy: per K-block the FP8 dot in FP32 (the `native` partial), the scale
    a_scale * b_scale in FP32, acc = fl(acc + partial * scale) with one rounding (an FMA; float64 holds the
    product of two FP32 values exactly)."""
    m, k = a.shape
    n = b.shape[1]
    blocks = -(-k // BLOCK_K)
    b_cols = np.repeat(np.asarray(b_scales), tb.cols or n, axis=1)[:, :n]
    acc = np.zeros((m, n), np.float32)
    for j in range(blocks):
        sl = slice(j * BLOCK_K, (j + 1) * BLOCK_K)
        ones_a, ones_b = jnp.ones((m, 1), jnp.float32), jnp.ones((1, b_scales.shape[1]), jnp.float32)
        partial = blocked_matmul(a[:, sl], ones_a, ta, b[sl], ones_b, tb, "native")  # unit scales: exact
        scale = np.asarray(a_scales)[:, j, None] * b_cols[j][None, :]
        acc = (acc.astype(np.float64) + np.asarray(partial, np.float64) * scale.astype(np.float64)).astype(np.float32)
    return acc


def _whole_columns(b: jax.Array, b_scales: jax.Array, tb: fp8.Tiling) -> tuple[jax.Array, jax.Array]:
    """b [K, N] and its scales with N zero-padded to whole 128-column tiles, as the kernel multiplies it: XLA:CPU's
    dot sums the columns of a ragged last vector tile in another order, so the references' bits depend on N."""
    n = b.shape[1]
    np_ = -(-n // 128) * 128
    cols = -(-np_ // (tb.cols or n))
    b = jnp.pad(b, ((0, 0), (0, np_ - n)))
    return b, jnp.pad(b_scales, ((0, 0), (0, cols - b_scales.shape[1])), constant_values=1.0)


def _bitwise(a, a_scales, ta, b, b_scales, tb, backend: str | None) -> np.ndarray:
    """A reference (`backend`, or the FMA promotion for None) on whole column tiles, cut back to N."""
    n = b.shape[1]
    b, b_scales = _whole_columns(b, b_scales, tb)
    if backend is None:
        return _fma_reference(a, a_scales, ta, b, b_scales, tb)[:, :n]
    return np.asarray(blocked_matmul(a, a_scales, ta, b, b_scales, tb, backend))[:, :n]


def _check_all(ours, a, a_scales, ta, b, b_scales, tb, *, pow2: bool) -> dict[str, float]:
    """Compare the kernel's f32 output to every reference (module docstring); returns the errors in u * S."""
    blocks = -(-a.shape[1] // BLOCK_K)
    s = _abs_product(a, a_scales, ta, b, b_scales, tb)
    errors = {}
    for backend in fp8.BACKENDS:
        ref = blocked_matmul(a, a_scales, ta, b, b_scales, tb, backend)
        errors[backend] = _error_in_units(ours, ref, s)
    bound = BLOCK_K + 2 * blocks + 2
    assert errors["exact"] <= bound, errors
    assert errors["emulate"] <= 2 * bound, errors
    assert errors["native"] <= 4 * blocks, errors
    if pow2:
        np.testing.assert_array_equal(ours, _bitwise(a, a_scales, ta, b, b_scales, tb, "native"))
    np.testing.assert_array_equal(ours, _bitwise(a, a_scales, ta, b, b_scales, tb, None))
    return errors


SHAPES = {  # M, K, N: whole tiles; M not a multiple of block_m; nothing a multiple of anything
    "tiled": (64, 256, 128),
    "pad-m": (200, 384, 256),
    "pad-all": (130, 300, 200),
}


# ---------------------------------------------------------------------------------------------------------------
# Dense: forward, dX, dW
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _forward_operands(shape: str, pow2: bool):
    m, k, n = SHAPES[shape]
    r = _recipe(pow2)
    xq, xs = quantize(_normal(0, m, k), r.x)
    wq, ws = quantize(_normal(1, k, n), r.w)
    return r, xq, xs, wq, ws


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("shape", ["tiled", "pad-all"])
def test_forward_equals_blocked_matmul(shape, pow2):
    """y = x @ w with 1 x 128 activation tiles and 128 x 128 weight blocks; 64-row tiles so M spans several."""
    r, xq, xs, wq, ws = _forward_operands(shape, pow2)
    ours = block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, block_m=64, interpret=True)
    assert ours.shape == (xq.shape[0], wq.shape[1]) and ours.dtype == jnp.float32
    _check_all(ours, xq, xs, r.x, wq, ws, r.w, pow2=pow2)


def test_bfloat16_output_is_the_float32_tile_cast_once():
    r, xq, xs, wq, ws = _forward_operands("pad-all", False)
    f32 = block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=True)
    bf16 = block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.bfloat16, interpret=True)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))


@pytest.mark.parametrize("tiles", [dict(block_m=16, block_n=32), dict(block_m=128, block_n=256)])
def test_tile_sizes_do_not_change_the_result(tiles):
    """Each output element is computed by one program, whatever the tile: the same bits for any tiling."""
    r, xq, xs, wq, ws = _forward_operands("pad-m", False)
    base = block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, block_m=64, interpret=True)
    ours = block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=True, **tiles)
    np.testing.assert_array_equal(ours, base)


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("shape", ["pad-all"])
def test_input_gradient_equals_linear_bwd(shape, pow2):
    """dX = dY @ W^T as `_linear_bwd` computes it: dY per 1 x 128, W^T with W's blocks transposed; the kernel
    reads W [K, N] in place (`b_transposed`) instead of a transposed copy."""
    r, _, _, wq, ws = _forward_operands(shape, pow2)
    t_dy, t_wt, _, _ = r.backward_tilings()
    gq, gs = quantize(_normal(2, SHAPES[shape][0], wq.shape[1]), t_dy)
    ours = block_scaled_matmul_dx(gq, gs, wq, ws, out_dtype=jnp.float32, block_m=64, interpret=True)
    assert ours.shape == (gq.shape[0], wq.shape[0])
    _check_all(ours, gq, gs, t_dy, wq.T, ws.T, t_wt, pow2=pow2)


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("shape", ["pad-all"])
def test_weight_gradient_equals_linear_bwd(shape, pow2):
    """dW = X^T @ dY as `_linear_bwd` computes it: X^T re-quantised per 1 x 128 along tokens, dY per 128 x 1
    (one scale per column and token block: `b_block_n=1`); the token count is the contraction (130: padded)."""
    r, xq, xs, _, _ = _forward_operands(shape, pow2)
    _, _, t_xt, t_dy2 = r.backward_tilings()
    xtq, xts = quantize(dequantize(xq, xs, r.x).T, t_xt)
    gq2, gs2 = quantize(_normal(3, xq.shape[0], SHAPES[shape][2]), t_dy2)
    ours = block_scaled_matmul_dw(xtq, xts, gq2, gs2, block_m=64, interpret=True)
    assert ours.shape == (xq.shape[1], gq2.shape[1]) and ours.dtype == jnp.float32
    _check_all(ours, xtq, xts, t_xt, gq2, gs2, t_dy2, pow2=pow2)


def test_e5m2_gradient_against_e4m3_weights_is_widened_exactly():
    """dX with an E5M2 dY: no single FP8 dot takes two formats, so both are widened to BF16 in the kernel; the
    values are unchanged, so the same references and bounds hold."""
    r = _recipe(True, grad_fmt="e5m2")
    _, _, _, wq, ws = _forward_operands("pad-all", True)
    t_dy, t_wt, _, _ = r.backward_tilings()
    gq, gs = quantize(_normal(4, 130, wq.shape[1]), t_dy)
    assert gq.dtype == jnp.float8_e5m2
    ours = block_scaled_matmul_dx(gq, gs, wq, ws, out_dtype=jnp.float32, interpret=True)
    s = _abs_product(gq, gs, t_dy, wq.T, ws.T, t_wt)
    ref = blocked_matmul(gq, gs, t_dy, wq.T, ws.T, t_wt, "exact")
    assert _error_in_units(ours, ref, s) <= BLOCK_K + 2 * 3 + 2
    np.testing.assert_array_equal(ours, blocked_matmul(gq, gs, t_dy, wq.T, ws.T, t_wt, "emulate"))


# ---------------------------------------------------------------------------------------------------------------
# Grouped (routed experts)
# ---------------------------------------------------------------------------------------------------------------

ROWS, GK, GN = 160, 256, 200
GROUP_SIZES = {
    "uneven-with-empty": [0, 37, 64, 0, 50],  # 9 rows past the groups; 37 and 50 end inside a 32-row tile
    "all-rows": [40, 0, 33, 87, 0],
    "one-group": [0, 0, 160, 0, 0],
    "no-rows": [0, 0, 0, 0, 0],
}


@functools.cache
def _grouped_operands(pow2: bool):
    r = _recipe(pow2)
    rq, rs = quantize(_normal(5, ROWS, GK), r.x)
    w = _normal(6, len(GROUP_SIZES["all-rows"]), GK, GN)
    wq, ws = jax.vmap(lambda we: quantize(we, r.w))(w)
    return r, rq, rs, wq, ws


def _check_grouped(ours, a, a_scales, ta, b, b_scales, tb, sizes, *, pow2: bool) -> dict[str, float]:
    """Per group, the same references and bounds as the dense kernel; rows past the groups are exactly zero."""
    sizes_j = jnp.asarray(sizes, jnp.int32)
    blocks = -(-a.shape[1] // BLOCK_K)
    refs = {be: np.asarray(blocked_ragged_matmul(a, a_scales, ta, b, b_scales, tb, sizes_j, be))
            for be in fp8.BACKENDS}
    errors = dict.fromkeys(fp8.BACKENDS, 0.0)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        start += size
        if size == 0:
            continue
        s = _abs_product(a[rows], a_scales[rows], ta, b[g], b_scales[g], tb)
        for be in fp8.BACKENDS:
            errors[be] = max(errors[be], _error_in_units(ours[rows], refs[be][rows], s))
        operands = (a[rows], a_scales[rows], ta, b[g], b_scales[g], tb)
        np.testing.assert_array_equal(ours[rows], _bitwise(*operands, None))
        if pow2:  # the group's rows through the dense reference: the ragged one sums in its own order
            np.testing.assert_array_equal(ours[rows], _bitwise(*operands, "native"))
    np.testing.assert_array_equal(np.asarray(ours[start:]), 0)
    bound = BLOCK_K + 2 * blocks + 2
    assert errors["exact"] <= bound and errors["emulate"] <= 2 * bound and errors["native"] <= 4 * blocks, errors
    return errors


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("case", ["uneven-with-empty", "one-group", "no-rows"])
def test_grouped_forward_equals_blocked_ragged_matmul(case, pow2):
    r, rq, rs, wq, ws = _grouped_operands(pow2)
    sizes = GROUP_SIZES[case]
    ours = block_scaled_grouped_matmul(
        rq, rs, wq, ws, jnp.asarray(sizes, jnp.int32), out_dtype=jnp.float32, block_m=32, interpret=True
    )
    assert ours.shape == (ROWS, GN) and ours.dtype == jnp.float32
    _check_grouped(np.asarray(ours), rq, rs, r.x, wq, ws, r.w, sizes, pow2=pow2)


@pytest.mark.parametrize("case", ["uneven-with-empty"])
def test_grouped_input_gradient_equals_grouped_bwd(case):
    """d(rows) = dY @ W_g^T as `_grouped_bwd` computes it, the expert weights read in place ([G, K, N])."""
    r, _, _, wq, ws = _grouped_operands(False)
    t_dy, t_wt, _, _ = r.backward_tilings()
    gq, gs = quantize(_normal(7, ROWS, GN), t_dy)
    sizes = GROUP_SIZES[case]
    ours = block_scaled_grouped_matmul(
        gq, gs, wq, ws.transpose(0, 2, 1), jnp.asarray(sizes), out_dtype=jnp.float32, b_transposed=True,
        block_m=32, interpret=True,
    )
    assert ours.shape == (ROWS, GK)
    _check_grouped(
        np.asarray(ours), gq, gs, t_dy, wq.transpose(0, 2, 1), ws.transpose(0, 2, 1), t_wt, sizes, pow2=False
    )


def test_grouped_padding_tiles_are_skipped():
    """The group-aligned layout reserves a tile per group beyond the rows; tiles of padding only are marked -1
    (written as zeros, no GEMM), every other tile carries its own group."""
    sizes = jnp.asarray(GROUP_SIZES["uneven-with-empty"], jnp.int32)
    _, tile_group, valid, total = fp8_gemm._tile_table(sizes, ROWS, 32)
    assert total % 32 == 0 and int(valid.sum()) == 151
    # groups 1, 2, 4 need 2, 2 and 2 tiles of 32 rows
    np.testing.assert_array_equal(tile_group[:6], [1, 1, 2, 2, 4, 4])
    assert np.all(np.asarray(tile_group[6:]) == -1)


def _group_aligned(v: jax.Array, sizes: jax.Array) -> jax.Array:
    """v's rows in `fp8.group_aligned_rows`'s layout for 128-row tiles, rows past the groups dropped: what
    `fp8.grouped_weight_grad` quantises."""
    dest, _, total = fp8.group_aligned_rows(sizes, v.shape[0], BLOCK_K)
    dest = jnp.where(jnp.arange(v.shape[0]) < jnp.sum(sizes), dest, total)
    return jnp.zeros((total, v.shape[1]), v.dtype).at[dest].set(v, mode="drop")


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("case", ["uneven-with-empty", "all-rows", "no-rows"])
def test_grouped_weight_gradient_equals_grouped_weight_grad(case, pow2):
    """dW[e] = x_e^T @ dY_e as `_grouped_bwd` computes it (`fp8.grouped_weight_grad`): rows padded per group to
    128-row tiles, x and dY quantised per 128 x 1 tile, each expert's tiles its K-blocks. K = 256 and N = 200
    in 64 x 128 output tiles (N padded)."""
    r = _recipe(pow2)
    _, _, t_xt, t_dy2 = r.backward_tilings()
    tx = t_xt.transposed()
    x, g = _normal(8, ROWS, GK), _normal(9, ROWS, GN)
    sizes = jnp.asarray(GROUP_SIZES[case], jnp.int32)
    groups = sizes.shape[0]
    xq, xs = quantize(_group_aligned(x, sizes), tx)
    gq, gs = quantize(_group_aligned(g, sizes), t_dy2)
    ours = np.asarray(block_scaled_grouped_weight_grad(xq, xs, gq, gs, sizes, block_m=64, interpret=True))
    assert ours.shape == (groups, GK, GN)
    refs = {be: np.asarray(grouped_weight_grad(x, g, sizes, groups, tx, t_dy2, be)) for be in fp8.BACKENDS}
    counts = (np.asarray(sizes) + BLOCK_K - 1) // BLOCK_K
    starts = np.cumsum(counts) - counts
    for e in range(groups):
        if counts[e] == 0:
            np.testing.assert_array_equal(ours[e], 0)
            continue
        rows = slice(starts[e] * BLOCK_K, (starts[e] + counts[e]) * BLOCK_K)
        # as a dense GEMM: a = x_e^T per 1 x 128 tile along the rows, b = dY_e per 128 x 1
        operands = (xq[rows].T, xs[starts[e] : starts[e] + counts[e]].T, t_xt, gq[rows],
                    gs[starts[e] : starts[e] + counts[e]], t_dy2)
        s = _abs_product(*operands)
        bound = BLOCK_K + 2 * counts[e] + 2
        assert _error_in_units(ours[e], refs["exact"][e], s) <= bound
        assert _error_in_units(ours[e], refs["emulate"][e], s) <= 2 * bound
        assert _error_in_units(ours[e], refs["native"][e], s) <= 4 * counts[e]
        np.testing.assert_array_equal(ours[e], _bitwise(*operands, None))
        if pow2:  # on whole column tiles (the reference's own bits depend on N, see `_whole_columns`)
            np.testing.assert_array_equal(ours[e], _bitwise(*operands, "native"))


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


def _bad_dense_calls():
    r, xq, xs, wq, ws = _forward_operands("tiled", True)
    x32 = xq.astype(jnp.float32)
    return {
        "a-not-fp8": (lambda: block_scaled_matmul(x32, xs, wq, ws), "a must be float8"),
        "a-scales-shape": (lambda: block_scaled_matmul(xq, xs[:, :1], wq, ws), "a_scales must be"),
        "a-scales-dtype": (lambda: block_scaled_matmul(xq, xs.astype(jnp.bfloat16), wq, ws), "float32"),
        "contraction": (lambda: block_scaled_matmul(xq, xs, wq[:128], ws[:1]), "contraction sizes differ"),
        "b-scales-tiling": (lambda: block_scaled_matmul(xq, xs, wq, ws, b_block_n=1), "b_scales must be"),
        "b-transposed-layout": (lambda: block_scaled_matmul(xq, xs, wq, ws, b_transposed=True), "contraction"),
        "block-m-not-pow2": (lambda: block_scaled_matmul(xq, xs, wq, ws, block_m=96), "block_m must be"),
        "block-n-too-small": (lambda: block_scaled_matmul(xq, xs, wq, ws, block_n=8), "block_n must be"),
        "out-dtype": (lambda: block_scaled_matmul(xq, xs, wq, ws, out_dtype=jnp.int32), "out_dtype"),
        "b-3d": (lambda: block_scaled_matmul(xq, xs, wq[None], ws), "b must be 2-D"),
    }


@pytest.mark.parametrize("case", list(_bad_dense_calls()))
def test_dense_refuses_bad_operands(case):
    call, message = _bad_dense_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


def _bad_grouped_calls():
    r, rq, rs, wq, ws = _grouped_operands(True)
    sizes = jnp.asarray(GROUP_SIZES["all-rows"], jnp.int32)
    return {
        "b-2d": (lambda: block_scaled_grouped_matmul(rq, rs, wq[0], ws[0], sizes), r"b must be \[G, K, N\]"),
        "sizes-length": (lambda: block_scaled_grouped_matmul(rq, rs, wq, ws, sizes[:3]), "group_sizes must be"),
        "sizes-float": (
            lambda: block_scaled_grouped_matmul(rq, rs, wq, ws, sizes.astype(jnp.float32)), "group_sizes must be"
        ),
        "scales-not-per-expert": (lambda: block_scaled_grouped_matmul(rq, rs, wq, ws[0], sizes), "b_scales must be"),
        "contraction": (lambda: block_scaled_grouped_matmul(rq[:, :128], rs[:, :1], wq, ws, sizes), "contraction"),
        "block-m": (lambda: block_scaled_grouped_matmul(rq, rs, wq, ws, sizes, block_m=48), "block_m must be"),
        "dw-rows-not-tiles": (
            lambda: block_scaled_grouped_weight_grad(rq, rs[:1, :GK], rq, rs[:1, :GK], sizes), "whole number"
        ),
        "dw-rows-differ": (
            lambda: block_scaled_grouped_weight_grad(rq[:128], rs[:1], rq[:256], rs[:2], sizes), "must share R"
        ),
        "dw-scales": (lambda: block_scaled_grouped_weight_grad(rq[:128], rs[:1], rq[:128], rs[:1], sizes), "x_scales"),
        "dw-not-fp8": (
            lambda: block_scaled_grouped_weight_grad(rq[:128].astype(jnp.float32), rs[:1], rq[:128], rs[:1], sizes),
            "x must be",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_grouped_calls()))
def test_grouped_refuses_bad_operands(case):
    call, message = _bad_grouped_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------------
# The GPU lowering (no GPU needed: lowering to StableHLO + Triton IR runs on the CPU)
# ---------------------------------------------------------------------------------------------------------------


def _triton_kernels(f, *args) -> list[str]:
    """Lower `f` for CUDA and return the Triton IR of each Pallas kernel in it, as text. Every custom call must be
    a Triton kernel (not Mosaic GPU, which a `pallas_call` without Triton compiler parameters would get). Reads
    the kernel's serialized IR with jax 0.10.2's own Triton dialect context (an internal, pinned version)."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context

    module = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
    blobs = []

    def walk(op) -> None:
        if op.name == "stablehlo.custom_call":
            assert ir.StringAttr(op.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"
            blobs.append(ir.StringAttr(ir.DictAttr(op.attributes["mhlo.backend_config"])["ir"]).value_bytes)
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    walk(inner.operation)

    walk(module.operation)
    texts = []
    for blob in blobs:
        with _new_ir_context():
            texts.append(str(ir.Module.parse(blob)))
    return texts


_F8, _F32 = jnp.float8_e4m3fn, jnp.float32
_S = jax.ShapeDtypeStruct
LOWERINGS = {  # name: (function, abstract operands, the tt.dot operand type)
    "forward": (block_scaled_matmul, (_S((256, 384), _F8), _S((256, 3), _F32), _S((384, 256), _F8), _S((3, 2), _F32)),
                "128x128xf8E4M3FN"),
    "dx": (block_scaled_matmul_dx, (_S((256, 256), _F8), _S((256, 2), _F32), _S((384, 256), _F8), _S((3, 2), _F32)),
           "128x128xf8E4M3FN"),
    "dw": (block_scaled_matmul_dw, (_S((384, 256), _F8), _S((384, 2), _F32), _S((256, 256), _F8), _S((2, 256), _F32)),
           "128x128xf8E4M3FN"),
    "grouped": (block_scaled_grouped_matmul,
                (_S((256, 384), _F8), _S((256, 3), _F32), _S((4, 384, 256), _F8), _S((4, 3, 2), _F32),
                 _S((4,), jnp.int32)),
                "64x128xf8E4M3FN"),
    "grouped-dw": (block_scaled_grouped_weight_grad,
                   (_S((512, 256), _F8), _S((4, 256), _F32), _S((512, 256), _F8), _S((4, 256), _F32),
                    _S((4,), jnp.int32)),
                   "128x128xf8E4M3FN"),
    "e5m2-dx-widened": (block_scaled_matmul_dx,
                        (_S((256, 256), jnp.float8_e5m2), _S((256, 2), _F32), _S((384, 256), _F8), _S((3, 2), _F32)),
                        "128x128xbf16"),
}


@pytest.mark.parametrize("case", LOWERINGS)
def test_gpu_lowering_is_one_triton_kernel_with_an_fp8_dot_in_the_k_loop(case):
    """On CUDA each entry point is one Triton kernel whose K loop (`scf.for`, the FP32 accumulator a loop-carried
    tensor: registers) holds a `tt.dot` of FP8 operands into FP32: what Triton compiles to FP8 tensor-core MMAs.
    Two FP8 formats meet as BF16 (exact widening)."""
    f, args, operand = LOWERINGS[case]
    (kernel,) = _triton_kernels(f, *args)
    loops = [line for line in kernel.splitlines() if "scf.for" in line]
    assert len(loops) == 1 and "iter_args" in loops[0] and "xf32>" in loops[0], loops
    dots = [line for line in kernel.splitlines() if "tt.dot" in line]
    assert len(dots) == 1, dots
    assert f"tensor<{operand}> * tensor<" in dots[0] and dots[0].rstrip().split("->")[-1].split()[0].endswith(
        "xf32>"
    ), dots[0]
