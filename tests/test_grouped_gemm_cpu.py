"""The routed-size grouped GEMM for XLA:CPU against `lax.ragged_dot`: values, and gradients in the rows and the
weights, for uneven, empty and single groups, rows past the groups, tiles that do and do not divide the rows, in
float32 (to rounding) and bfloat16, and inside `lax.scan` over `jax.checkpoint` as a scanned layer calls it."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dsv3c.runtime.kernels.grouped_gemm_cpu import tile_rows, tiled_grouped_gemm

ROWS, K, N = 37, 8, 6
SIZES = {
    "uneven": [3, 0, 10, 1, 23],
    "empty-groups": [0, 9, 0, 0, 28],
    "one-group": [0, 0, 37, 0, 0],
    "trailing-rows": [5, 0, 11, 7, 2],  # 12 rows belong to no group
    "no-rows": [0, 0, 0, 0, 0],
}


def _operands(dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((ROWS, K)), dtype)
    w = jnp.asarray(rng.standard_normal((len(SIZES["uneven"]), K, N)), dtype)
    d_out = jnp.asarray(rng.standard_normal((ROWS, N)), dtype)
    return x, w, d_out


def _value_and_grads(gemm, x, w, sizes, d_out):
    out, vjp = jax.vjp(lambda a, b: gemm(a, b, sizes), x, w)
    return (out, *vjp(d_out))


@jax.jit
def _reference(x, w, sizes, d_out):
    return _value_and_grads(lax.ragged_dot, x, w, sizes, d_out)


@partial(jax.jit, static_argnames="tile")
def _tiled(x, w, sizes, d_out, tile: int):
    return _value_and_grads(partial(tiled_grouped_gemm, tile=tile), x, w, sizes, d_out)


@pytest.mark.parametrize("tile", [4, 16, 64])
@pytest.mark.parametrize("case", SIZES)
def test_float32_values_and_gradients_equal_ragged_dot(case, tile):
    """Tile 4 cuts every group, 16 does not divide the 37 rows, 64 holds them all in one tile."""
    x, w, d_out = _operands(jnp.float32)
    sizes = jnp.asarray(SIZES[case], jnp.int32)
    with jax.default_matmul_precision("highest"):
        ours, ref = _tiled(x, w, sizes, d_out, tile), _reference(x, w, sizes, d_out)
    for name, a, b in zip(("out", "d_rows", "d_weights"), ours, ref, strict=True):
        assert a.dtype == b.dtype == jnp.float32, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    trailing = int(sum(SIZES[case]))
    assert not np.any(np.asarray(ours[0])[trailing:]), "rows past the groups must be zero"
    assert not np.any(np.asarray(ours[1])[trailing:]), "their gradient too"


@pytest.mark.parametrize("case", ["uneven", "trailing-rows"])
def test_bfloat16_stays_bfloat16_and_is_rounded_float32(case):
    """bf16 in, bf16 out (like ragged_dot at default precision), from a float32 accumulation: within bf16 rounding
    of the float32 reference on the same (bf16-representable) operands."""
    x, w, d_out = _operands(jnp.bfloat16, seed=1)
    sizes = jnp.asarray(SIZES[case], jnp.int32)
    ours = _tiled(x, w, sizes, d_out, 8)
    with jax.default_matmul_precision("highest"):
        ref = _reference(*(a.astype(jnp.float32) for a in (x, w)), sizes, d_out.astype(jnp.float32))
    for name, a, b in zip(("out", "d_rows", "d_weights"), ours, ref, strict=True):
        assert a.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2, atol=2e-2, err_msg=name)


FEW = {"spread": [1, 0, 2, 0, 1, 1, 0, 1], "trailing-rows": [0, 3, 0, 0, 0, 0, 1, 0], "no-rows": [0] * 8}
"""Six rows over eight groups (a decode step's rows): the per-row form, which gathers each row's weights."""


@pytest.mark.parametrize("case", FEW)
def test_no_more_rows_than_groups_equal_ragged_dot(case):
    rng = np.random.default_rng(2)
    x, d_out = (jnp.asarray(rng.standard_normal((6, n)), jnp.float32) for n in (K, N))
    w = jnp.asarray(rng.standard_normal((8, K, N)), jnp.float32)
    sizes = jnp.asarray(FEW[case], jnp.int32)
    with jax.default_matmul_precision("highest"):
        ours, ref = _tiled(x, w, sizes, d_out, 16), _reference(x, w, sizes, d_out)
    for name, a, b in zip(("out", "d_rows", "d_weights"), ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.any(np.asarray(ours[0])[sum(FEW[case]):]), "rows past the groups must be zero"


def test_inside_scanned_checkpointed_layers():
    """Two layers' weights scanned over, each layer under `jax.checkpoint`: the loss and its gradients (input and
    both layers' weights) equal those of ragged_dot in the same structure."""
    x, _, _ = _operands(jnp.float32)
    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.standard_normal((2, len(SIZES["uneven"]), K, K)) / np.sqrt(K), jnp.float32)
    sizes = jnp.asarray(SIZES["trailing-rows"], jnp.int32)

    def loss(gemm, x, weights):
        def layer(h, w):
            return jnp.tanh(gemm(h, w, sizes)), None

        h, _ = lax.scan(jax.checkpoint(layer), x, weights)
        return jnp.sum(h**2)

    with jax.default_matmul_precision("highest"):
        ours = jax.jit(jax.value_and_grad(lambda *a: loss(tiled_grouped_gemm, *a), argnums=(0, 1)))(x, weights)
        ref = jax.jit(jax.value_and_grad(lambda *a: loss(lax.ragged_dot, *a), argnums=(0, 1)))(x, weights)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_are_never_widened_whole():
    """The windows and the groups' weights are sliced in bf16: XLA:CPU widens a bf16 dynamic slice to f32 and hoists
    the widening of a loop-invariant operand out of the loop, which converted the whole expert stack, the padded
    rows and their transpose to f32 before the loops read them back (`_slice`). The compiled forward and backward
    convert no array of those shapes to f32 (their f32 outputs and accumulators are no conversions)."""
    rng = np.random.default_rng(3)
    groups, rows, k, n, tile = 4, 64, 32, 24, 16
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((groups, k, n)), jnp.bfloat16)
    sizes = jnp.asarray([10, 30, 0, 24], jnp.int32)
    d_out = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
    text = _tiled.lower(x, w, sizes, d_out, tile=tile).compile().as_text()
    padded = rows + tile
    for shape in (f"{groups},{k},{n}", f"{padded},{k}", f"{k},{padded}", f"{padded},{n}"):
        assert not re.search(rf"= f32\[{shape}\]\{{[\d,]*\}} convert\(", text), shape


def test_group_sizes_are_traced_and_shapes_checked():
    """One compilation serves any routing; malformed operands are rejected before tracing the loop."""
    x, w, _ = _operands(jnp.float32)
    gemm = jax.jit(tiled_grouped_gemm)
    for sizes in SIZES.values():
        sizes = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(gemm(x, w, sizes), lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert gemm._cache_size() == 1
    with pytest.raises(ValueError, match="group sizes"):
        tiled_grouped_gemm(x, w, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="not \\[T, K\\]"):
        tiled_grouped_gemm(x[:, :5], w, jnp.zeros(5, jnp.int32))


def test_default_tile_follows_the_mean_group_size():
    assert tile_rows(8192, 16) == 256  # 512 rows per group
    assert tile_rows(2048, 256) == 16  # 8 rows per group: the smallest tile
    assert tile_rows(4096, 64) == 32
