"""FP8 (dsv3-fp8-quant and its lowering) against an independent NumPy emulation written here with ml_dtypes.

The emulation states the recipe once, in NumPy: scale = amax * fl(1/FP8_MAX) per tile, values = x * fl(1/scale)
clipped and rounded to the FP8 type; a GEMM sums the exact products of each K-block (float64 holds them exactly),
scales each block sum in float64, rounds it to FP32 and adds the blocks in K order in FP32. The CPU lowering must
reproduce it bit for bit, forward and backward. Against full precision, the checks are the bounds that follow from
the formats (E4M3: 3 mantissa bits, relative rounding error <= 2^-4 in the normal range).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ir_eval import ir_function

import dsv3c
from dsv3c.cli import main
from dsv3c.dialects.dsv3 import ExpertsOp
from dsv3c.dialects.quant import DequantizeOp, FP8MatmulOp, QuantizeOp
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.fp8 import fp8_gemms
from dsv3c.frontend.errors import UserError
from dsv3c.passes.fp8_quant import weight_param
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.data import SyntheticStream
from dsv3c.runtime.fp8_weights import from_hf_block_fp8, store_fp8
from dsv3c.runtime.loop import train

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

NP_FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
IR_FP8 = {"e4m3": "f8E4M3FN", "e5m2": "f8E5M2"}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
MIN_NORMAL = {"e4m3": 2.0**-6, "e5m2": 2.0**-14}
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}
F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------------------------------------------------------
# The NumPy emulation
# ---------------------------------------------------------------------------------------------------------------


def np_quantize(x, rows: int, cols: int, fmt: str = "e4m3", pow2: bool = False):
    """x [R, C] -> (FP8 values, f32 scales [ceil(R/rows), ceil(C/cols)]); a tile size 0 is the whole axis."""
    x = np.asarray(x, F32)
    r, c = x.shape
    tr, tc = rows or r, cols or c
    pr, pc = math.ceil(r / tr) * tr, math.ceil(c / tc) * tc
    padded = np.zeros((pr, pc), F32)
    padded[:r, :c] = x
    tiles = padded.reshape(pr // tr, tr, pc // tc, tc)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale = (amax * F32(1.0 / FMAX[fmt])).astype(F32)
    if pow2:
        mantissa, exponent = np.frexp(scale)
        scale = np.ldexp(F32(1.0), exponent - (mantissa == 0.5)).astype(F32)
    scale = np.where(amax > 0, scale, F32(1.0)).astype(F32)
    inverse = (F32(1.0) / scale).astype(F32)
    values = np.clip(tiles * inverse[:, None, :, None], -FMAX[fmt], FMAX[fmt]).astype(NP_FP8[fmt])
    return values.reshape(pr, pc)[:r, :c], scale


def np_dequantize(values, scales, rows: int, cols: int):
    r, c = values.shape
    full = np.repeat(np.repeat(scales, rows or r, axis=0), cols or c, axis=1)[:r, :c]
    return values.astype(F32) * full


def np_gemm(a, a_s, b, b_s, kb: int, nb: int):
    """a [M, K] FP8 with scales [M, K/kb] (kb = 0: one scale), b [K, N] FP8 with scales [K/kb, N/nb]."""
    m, k = a.shape
    n = b.shape[1]
    if kb == 0:
        exact = a.astype(F64) @ b.astype(F64)
        return (exact * F64(F32(a_s[0, 0] * b_s[0, 0]))).astype(F32)
    b_cols = np.repeat(b_s, nb, axis=1)[:, :n]
    acc = np.zeros((m, n), F32)
    for j in range(math.ceil(k / kb)):
        block = slice(j * kb, (j + 1) * kb)
        exact = a[:, block].astype(F64) @ b[block].astype(F64)
        scale = (a_s[:, j, None] * b_cols[j, None, :]).astype(F32)
        acc = (acc + (exact * scale.astype(F64)).astype(F32)).astype(F32)
    return acc


def np_fp8_linear(x, w, g, block: int, per_tensor: bool = False, grad_fmt: str = "e4m3", pow2: bool = False):
    """Forward y = x @ w and the FP8 backward (dx, dw) for an upstream gradient g, as DeepSeek-V3 does it."""
    t = (0, 0) if per_tensor else (1, block)
    tw = (0, 0) if per_tensor else (block, block)
    kb, nb = (0, 0) if per_tensor else (block, block)
    xq, xs = np_quantize(x, *t, pow2=pow2)
    wq, ws = np_quantize(w, *tw, pow2=pow2)
    y = np_gemm(xq, xs, wq, ws, kb, nb)
    gq, gs = np_quantize(g, *t, fmt=grad_fmt, pow2=pow2)  # dY per 1 x block along N
    dx = np_gemm(gq, gs, wq.T, ws.T, kb, 0 if per_tensor else block)  # W^T reuses the square blocks
    if per_tensor:
        xtq, xts = xq.T, xs
        gq2, gs2 = gq, gs
        dw = np_gemm(xtq, xts, gq2, gs2, 0, 0)
    else:  # X^T re-quantised from its FP8 values, 1 x block along tokens; dY block x 1
        xtq, xts = np_quantize(np_dequantize(xq, xs, 1, block).T, 1, block, pow2=pow2)
        gq2, gs2 = np_quantize(g, block, 1, fmt=grad_fmt, pow2=pow2)
        dw = np_gemm(xtq, xts, gq2, gs2, block, 1)
    return y, dx, dw


# ---------------------------------------------------------------------------------------------------------------
# IR helpers
# ---------------------------------------------------------------------------------------------------------------


def quant(fmt: str, tile: str, rule: str = "amax") -> str:
    return f"#dsv3.quant<{IR_FP8[fmt]}, {tile}, {rule}>"


def linear_ir(m: int, k: int, n: int, block: int, per_tensor=False, grad="e4m3", pow2=False, out="f32") -> str:
    """quantize x, quantize w, fp8_matmul: what dsv3-fp8-quant makes of one matmul."""
    rule = "pow2" if pow2 else "amax"
    tx, tw, tg = ("tensor",) * 3 if per_tensor else (f"[1, {block}]", f"[{block}, {block}]", f"[1, {block}]")
    kb = 1 if per_tensor else math.ceil(k / block)
    xs = "1x1" if per_tensor else f"{m}x{kb}"
    ws = "1x1" if per_tensor else f"{kb}x{math.ceil(n / block)}"
    qx, qw, qg = quant("e4m3", tx, rule), quant("e4m3", tw, rule), quant(grad, tg, rule)
    return f"""builtin.module {{
  func.func @f(%x: tensor<{m}x{k}xf32>, %w: tensor<{k}x{n}xf32>) -> tensor<{m}x{n}x{out}> {{
    %xq, %xs = dsv3.quantize %x {{quant = {qx}}} : (tensor<{m}x{k}xf32>) -> (tensor<{m}x{k}xf8E4M3FN>, tensor<{xs}xf32>)
    %wq, %ws = dsv3.quantize %w {{quant = {qw}}} : (tensor<{k}x{n}xf32>) -> (tensor<{k}x{n}xf8E4M3FN>, tensor<{ws}xf32>)
    %y = dsv3.fp8_matmul %xq, %xs, %wq, %ws {{x_quant = {qx}, w_quant = {qw}, grad_quant = {qg}}} : (tensor<{m}x{k}xf8E4M3FN>, tensor<{xs}xf32>, tensor<{k}x{n}xf8E4M3FN>, tensor<{ws}xf32>) -> tensor<{m}x{n}x{out}>
    func.return %y : tensor<{m}x{n}x{out}>
  }}
}}"""  # noqa: E501 (one op a line)


def _value_and_vjp(fn, x, w, g):
    """fn's first result at (x, w) and its VJP with g."""
    y, vjp = jax.vjp(lambda a, b: fn(a, b)[0], x, w)
    return (y, *vjp(g))


def outlier_activations(rng, m: int, k: int) -> np.ndarray:
    """LLM-like activations: unit-scale noise whose rows vary in size, plus a few channels ~100x larger (the
    massive-activation channels of real models)."""
    x = rng.standard_normal((m, k)) * np.exp(0.5 * rng.standard_normal((m, 1)))
    hot = rng.choice(k, size=max(1, k // 64), replace=False)
    x[:, hot] *= 100.0
    return x.astype(F32)


# ---------------------------------------------------------------------------------------------------------------
# Quantise / dequantise
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "rule"), [("e4m3", "amax"), ("e4m3", "pow2"), ("e5m2", "amax")])
def test_quantize_round_trip_is_the_emulation_and_within_the_format_bounds(fmt, rule):
    rng = np.random.default_rng(0)
    x = outlier_activations(rng, 24, 200)  # 200 = one full 128-tile and a padded one
    x[5, 7] = 0.0
    x[6] = 0.0  # an all-zero row: its tiles get scale 1
    m, k = x.shape
    q = quant(fmt, "[1, 128]", rule)
    text = f"""builtin.module {{
  func.func @f(%x: tensor<{m}x{k}xf32>) -> (tensor<{m}x{k}x{IR_FP8[fmt]}>, tensor<{m}x2xf32>, tensor<{m}x{k}xf32>) {{
    %q, %s = dsv3.quantize %x {{quant = {q}}} : (tensor<{m}x{k}xf32>) -> (tensor<{m}x{k}x{IR_FP8[fmt]}>, tensor<{m}x2xf32>)
    %y = dsv3.dequantize %q, %s {{quant = {q}}} : (tensor<{m}x{k}x{IR_FP8[fmt]}>, tensor<{m}x2xf32>) -> tensor<{m}x{k}xf32>
    func.return %q, %s, %y : tensor<{m}x{k}x{IR_FP8[fmt]}>, tensor<{m}x2xf32>, tensor<{m}x{k}xf32>
  }}
}}"""  # noqa: E501
    values, scales, back = (np.asarray(v) for v in jax.jit(ir_function(text))(jnp.asarray(x)))
    ref_values, ref_scales = np_quantize(x, 1, 128, fmt, pow2=rule == "pow2")
    assert values.dtype == NP_FP8[fmt]
    np.testing.assert_array_equal(values.view(np.uint8), ref_values.view(np.uint8))
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(scales[6], [1.0, 1.0])
    if rule == "pow2":
        assert np.all(np.log2(scales) == np.round(np.log2(scales)))

    # No overflow at amax: every value finite, and each tile's amax element lands on (or just under) FP8_MAX.
    as_float = values.astype(F64)
    assert np.all(np.isfinite(as_float)) and np.abs(as_float).max() <= FMAX[fmt]
    full_scales = np.repeat(scales, 128, axis=1)[:, :k].astype(F64)
    for tile in (slice(0, 128), slice(128, k)):
        row = np.abs(x[:, tile]).argmax(axis=1)
        top = np.abs(as_float[np.arange(m), tile.start + row])
        live = np.abs(x[:, tile]).max(axis=1) > 0
        if rule == "amax":
            np.testing.assert_array_equal(top[live], FMAX[fmt])
        else:  # the scale is rounded up to a power of two: amax lands in [FP8_MAX/2, FP8_MAX]
            assert np.all((top[live] >= FMAX[fmt] / 2) & (top[live] <= FMAX[fmt]))

    # Relative error <= 2^-(mantissa bits + 1) in the normal range; half a subnormal step below it.
    scaled = np.abs(x.astype(F64) / full_scales)
    err = np.abs(back.astype(F64) - x)
    normal = scaled >= MIN_NORMAL[fmt]
    bound = 2.0 ** -(MANTISSA_BITS[fmt] + 1)
    assert np.all(err[normal] <= bound * np.abs(x[normal]) * (1 + 1e-6))
    step = MIN_NORMAL[fmt] * 2.0 ** -MANTISSA_BITS[fmt]
    assert np.all(err[~normal] <= 0.5 * step * full_scales[~normal] * (1 + 1e-6))
    assert normal.mean() > 0.9  # the bound above is the one that matters


def massive_activations(rng, m: int, k: int, factor: float = 1e5) -> np.ndarray:
    """SwiGLU outputs (a down projection's input: heavy-tailed, per-token scales) in which one token in 128 carries
    two "massive activations" `factor` times the median magnitude; Sun et al. (2024) report them up to 100,000
    times larger than typical activations."""
    x = rng.standard_normal((m, k))
    x = x / (1 + np.exp(-x)) * rng.standard_normal((m, k)) * np.exp(0.5 * rng.standard_normal((m, 1)))
    tokens, channels = rng.choice(m, m // 128, replace=False), rng.choice(k, 2, replace=False)
    x[np.ix_(tokens, channels)] = factor * np.median(np.abs(x)) * rng.choice([-1.0, 1.0], (len(tokens), 2))
    return x.astype(F32)


def test_fine_grained_scaling_is_several_times_more_accurate_than_per_tensor_on_outliers():
    rng = np.random.default_rng(1)
    x = massive_activations(rng, 256, 1024)
    w = (rng.standard_normal((1024, 384)) / 32).astype(F32)
    stats = {}
    for name, tile in (("1x128", (1, 128)), ("tensor", (0, 0))):
        values, scales = np_quantize(x, *tile)
        err = np.abs(np_dequantize(values, scales, *tile) - x)
        stats[name] = {
            "element": np.mean(err / np.abs(x)),  # how well each value survives
            "token": np.mean(np.linalg.norm(err, axis=1) / np.linalg.norm(x, axis=1)),  # energy-weighted, per token
            "zeros": np.mean(values.astype(F32) == 0),
        }
    fine, coarse = stats["1x128"], stats["tensor"]
    assert coarse["element"] / fine["element"] > 8, stats  # per-tensor flushes the bulk towards zero...
    assert coarse["zeros"] > 0.1 and fine["zeros"] < 0.001, stats
    assert coarse["token"] / fine["token"] > 1.5, stats  # ...which costs less where the energy is (E4M3's range)
    assert fine["element"] < 2.0**-4 / 2  # mean error of a uniform rounding within +-2^-4
    # through the FP8 GEMM, as the lowering computes it
    exact = x.astype(F64) @ w
    out = {}
    for per_tensor in (False, True):
        y = np.asarray(jax.jit(ir_function(linear_ir(256, 1024, 384, 128, per_tensor=per_tensor)))(x, w)[0])
        out[per_tensor] = np.mean(np.linalg.norm(y - exact, axis=1) / np.linalg.norm(exact, axis=1))
    assert out[True] / out[False] > 1.3, out


# ---------------------------------------------------------------------------------------------------------------
# FP8 matmul: forward and backward, bit for bit
# ---------------------------------------------------------------------------------------------------------------

LINEAR_CASES = {
    "1x128": dict(m=48, k=320, n=200, block=128),  # K and N not multiples of the tile: padded
    "1x32": dict(m=64, k=96, n=64, block=32),
    "pow2": dict(m=40, k=256, n=136, block=128, pow2=True),
    "e5m2-grads": dict(m=64, k=256, n=128, block=128, grad="e5m2"),
    "per-tensor": dict(m=32, k=200, n=72, block=128, per_tensor=True),
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_fp8_matmul_and_its_gradients_equal_the_numpy_emulation_bit_for_bit(case):
    c = LINEAR_CASES[case]
    m, k, n, block = c["m"], c["k"], c["n"], c["block"]
    rng = np.random.default_rng(2)
    x = outlier_activations(rng, m, k)
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(F32)
    g = (rng.standard_normal((m, n)) * np.exp(rng.standard_normal((m, 1)))).astype(F32)
    fn = ir_function(linear_ir(m, k, n, block, c.get("per_tensor", False), c.get("grad", "e4m3"), c.get("pow2", False)))
    y, dx, dw = jax.jit(lambda a, b, c: _value_and_vjp(fn, a, b, c))(x, w, g)
    ref_y, ref_dx, ref_dw = np_fp8_linear(
        x, w, g, block, c.get("per_tensor", False), c.get("grad", "e4m3"), c.get("pow2", False)
    )
    np.testing.assert_array_equal(np.asarray(y), ref_y)
    np.testing.assert_array_equal(np.asarray(dx), ref_dx)
    np.testing.assert_array_equal(np.asarray(dw), ref_dw)


def test_the_pallas_backend_runs_the_kernels_to_fp32_rounding_of_the_exact_emulation():
    """The GPU target's backend on one device (`pallas`): lowered for the CPU, its block-scaled GEMMs run the Pallas
    kernels in the interpreter. The FP8 linear's value and both gradients, and the FP8 experts' output and weight
    gradients, equal the exact emulation's to a few FP32 roundings of the largest entry (the kernels add each
    K-block's FP32 partial in FP32, the emulation sums a block exactly)."""
    m, k, n = 64, 256, 192
    rng = np.random.default_rng(5)
    x = outlier_activations(rng, m, k)
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(F32)
    g = rng.standard_normal((m, n)).astype(F32)
    results = {}
    for backend in ("exact", "pallas"):
        fn = ir_function(linear_ir(m, k, n, 128), fp8_backend=backend)
        results[backend] = jax.jit(lambda a, b, c, fn=fn: _value_and_vjp(fn, a, b, c))(x, w, g)
    for name, want, got in zip(("y", "dx", "dw"), results["exact"], results["pallas"], strict=True):
        want, got = np.asarray(want), np.asarray(got)
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * 2**-23 * np.abs(want).max(), err_msg=name)
    tokens, dim, hidden, experts, top_k = 64, 160, 128, 4, 2
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])[None].astype(np.int32)
    gate_w = rng.random((1, tokens, top_k)).astype(F32)
    xs = outlier_activations(rng, tokens, dim)[None] * 0.1
    ws = [(rng.standard_normal(s) / math.sqrt(s[1])).astype(F32)
          for s in ((experts, dim, hidden), (experts, dim, hidden), (experts, hidden, dim))]
    upstream = rng.standard_normal((1, tokens, dim)).astype(F32)
    for backend in ("exact", "pallas"):
        fn = ir_function(experts_ir(True, tokens, dim, hidden, experts, top_k, 128), fp8_backend=backend)

        def loss(*a, fn=fn):
            return jnp.sum(fn(a[0], gate_w, ids, *a[1:])[0] * upstream)

        results[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(xs, *ws)
    (want_loss, want_grads), (got_loss, got_grads) = results["exact"], results["pallas"]
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for name, want, got in zip(("dx", "dgate", "dup", "ddown"), want_grads, got_grads, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        np.testing.assert_allclose(got, want, rtol=0, atol=64 * 2**-23 * np.abs(want).max(), err_msg=name)


def test_fp8_gradients_are_close_to_bf16_ones():
    m, k, n = 256, 512, 384
    rng = np.random.default_rng(3)
    x = outlier_activations(rng, m, k) * 0.05
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(F32)
    g = rng.standard_normal((m, n)).astype(F32)
    fn = ir_function(linear_ir(m, k, n, 128))
    fp8_grads = jax.jit(lambda a, b, c: _value_and_vjp(fn, a, b, c)[1:])(x, w, g)
    bf16 = jnp.bfloat16
    _, vjp16 = jax.vjp(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
                       jnp.asarray(x, bf16), jnp.asarray(w, bf16))
    bf16_grads = vjp16(jnp.asarray(g))
    exact = (g.astype(F64) @ w.T.astype(F64), x.T.astype(F64) @ g)
    for ours, theirs, truth in zip(fp8_grads, bf16_grads, exact, strict=True):
        ours, theirs = np.asarray(ours, F64), np.asarray(theirs, F64)
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        cosine = np.sum(ours * theirs) / (np.linalg.norm(ours) * np.linalg.norm(theirs))
        assert rel < 0.05 and cosine > 0.999, (rel, cosine)
        # FP8's error against the exact product is BF16's scaled by the mantissa bits (2^-4 vs 2^-8 per rounding)
        ratio = np.linalg.norm(ours - truth) / np.linalg.norm(theirs - truth)
        assert 4 < ratio < 32, ratio


# ---------------------------------------------------------------------------------------------------------------
# FP8 experts
# ---------------------------------------------------------------------------------------------------------------


def experts_ir(quantized: bool, tokens: int, dim: int, hidden: int, experts: int, top_k: int, block: int) -> str:
    props = ""
    if quantized:
        props = (f" {{x_quant = {quant('e4m3', f'[1, {block}]')}, w_quant = {quant('e4m3', f'[{block}, {block}]')}, "
                 f"grad_quant = {quant('e4m3', f'[1, {block}]')}}}")
    t = f"tensor<1x{tokens}"
    return f"""builtin.module {{
  func.func @f(%x: {t}x{dim}xf32>, %gw: {t}x{top_k}xf32>, %ids: {t}x{top_k}xi32>, %g: tensor<{experts}x{dim}x{hidden}xf32>, %u: tensor<{experts}x{dim}x{hidden}xf32>, %d: tensor<{experts}x{hidden}x{dim}xf32>) -> {t}x{dim}xf32> {{
    %y = dsv3.experts %x, %gw, %ids, %g, %u, %d{props} : ({t}x{dim}xf32>, {t}x{top_k}xf32>, {t}x{top_k}xi32>, tensor<{experts}x{dim}x{hidden}xf32>, tensor<{experts}x{dim}x{hidden}xf32>, tensor<{experts}x{hidden}x{dim}xf32>) -> {t}x{dim}xf32>
    func.return %y : {t}x{dim}xf32>
  }}
}}"""  # noqa: E501


def test_fp8_experts_forward_and_gradients_are_close_to_full_precision():
    tokens, dim, hidden, experts, top_k, block = 96, 64, 96, 4, 2, 32
    rng = np.random.default_rng(4)
    x = outlier_activations(rng, tokens, dim)[None] * 0.1
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])[None].astype(np.int32)
    gate_w = rng.random((1, tokens, top_k)).astype(F32)
    ws = [(rng.standard_normal(s) / math.sqrt(s[1])).astype(F32)
          for s in ((experts, dim, hidden), (experts, dim, hidden), (experts, hidden, dim))]
    upstream = rng.standard_normal((1, tokens, dim)).astype(F32)
    results = {}
    for op in ("experts", "fp8_experts"):
        fn = ir_function(experts_ir(op == "fp8_experts", tokens, dim, hidden, experts, top_k, block))

        def loss(x_, g_, u_, d_, fn=fn):
            return jnp.sum(fn(x_, gate_w, ids, g_, u_, d_)[0] * upstream)

        with jax.default_matmul_precision("highest"):
            out = jax.jit(lambda *a, fn=fn: fn(a[0], gate_w, ids, *a[1:])[0])(x, *ws)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, *ws)
        results[op] = (out, *grads)
    for name, full, ours in zip(("out", "dx", "dgate", "dup", "ddown"), results["experts"], results["fp8_experts"],
                                strict=True):
        full, ours = np.asarray(full, F64), np.asarray(ours, F64)
        rel = np.linalg.norm(ours - full) / np.linalg.norm(full)
        assert rel < 0.08, (name, rel)
        assert rel > 1e-4, (name, "FP8 should not be exact")  # the FP8 path really ran


# ---------------------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------------------

SMALL = """\
model small {
  vocab 64
  dim 32
  layers 2 { dense_first 1 }
  attention mla {
    heads 2
    q_lora_rank 16
    kv_lora_rank 16
    head_dim { nope 8, rope 4, v 8 }
  }
  ffn dense { hidden 64 }
  ffn moe {
    experts 4 { top_k 2, shared 1, hidden 32 }
    routing sigmoid { groups 1, keep_groups 1, scale 1.0, normalize true }
  }
  mtp { depth 1 }
  init { std 0.05 }
  dtype { params f32, compute f32 }
}
train {
  optimizer adamw { lr 1e-2, weight_decay 0.0 }
  schedule constant { warmup 0 }
}
"""


def _ops(module, kind):
    return [op for op in module.walk() if isinstance(op, kind)]


def _passed(pipeline: str, spec: str = SMALL):
    module = dsv3c.build_ir(dsv3c.parse(spec))
    run_pipeline(module, pipeline)
    return module


def _quantized_experts(module) -> list[ExpertsOp]:
    return [op for op in _ops(module, ExpertsOp) if op.quantized]


def test_pass_quantises_every_linear_but_the_head_and_the_experts_too():
    base = dsv3c.build_ir(dsv3c.parse(SMALL))
    matmuls = len([op for op in base.walk() if op.name == "dsv3.matmul"])
    module = _passed("dsv3-fp8-quant{block=16}")
    remaining = [op for op in module.walk() if op.name == "dsv3.matmul"]
    # the output head (main model and MTP) stays: its weight has the `vocab` axis
    assert len(remaining) == 2 and all(op.w.type.get_shape() == (32, 64) for op in remaining)
    assert len(_ops(module, FP8MatmulOp)) == matmuls - 2
    assert len(_ops(module, QuantizeOp)) == 2 * (matmuls - 2)
    assert len(_quantized_experts(module)) == 2  # the MoE layer and the MTP block
    text = print_ir(module)
    assert "#dsv3.quant<f8E4M3FN, [16, 16], amax>" in text and "#dsv3.quant<f8E4M3FN, [1, 16], amax>" in text
    assert parse_ir(text) is not None  # what the pass writes reads back


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ("per_tensor=true", "#dsv3.quant<f8E4M3FN, tensor, amax>"),
        ("pow2_scales=true", "#dsv3.quant<f8E4M3FN, [128, 128], pow2>"),
        ("bwd=e5m2", "grad_quant = #dsv3.quant<f8E5M2, [1, 128], amax>"),
    ],
)
def test_pass_options_reach_the_ir(options, expect):
    assert expect in print_ir(_passed(f"dsv3-fp8-quant{{{options}}}"))


def test_pass_exclusions_by_name_and_axis():
    module = _passed('dsv3-fp8-quant{exclude=vocab,"mtp.*",q_lora experts=false}')
    assert not _quantized_experts(module) and _ops(module, ExpertsOp) and _ops(module, FP8MatmulOp)

    def excluded(param) -> bool:
        return param.pname.startswith("mtp.") or bool({"vocab", "q_lora"} & set(param.axis_names))

    for op in module.walk():
        if op.name == "dsv3.matmul":
            assert excluded(weight_param(op.w)), weight_param(op.w).pname
        elif isinstance(op, FP8MatmulOp):
            assert not excluded(weight_param(op.w.owner.x)), weight_param(op.w.owner.x).pname
    everything = _passed("dsv3-fp8-quant{exclude=none}")
    assert not [op for op in everything.walk() if op.name == "dsv3.matmul"]  # even the head


def test_pass_rejects_bad_options():
    for bad in ("dsv3-fp8-quant{fwd=e3m4}", "dsv3-fp8-quant{block=0}", "dsv3-fp8-quant{tile=3}"):
        with pytest.raises(UserError, match="bad pass pipeline"):
            _passed(bad)


# ---------------------------------------------------------------------------------------------------------------
# Weight-only FP8 storage (inference)
# ---------------------------------------------------------------------------------------------------------------


def test_weights_only_stores_fp8_with_block_scales_and_composes_with_w8a8():
    module = _passed("dsv3-drop-mtp,dsv3-fp8-quant{block=16 weights_only=true}")
    params = {p.pname: p for p in module.walk() if p.name == "dsv3.param"}
    wq_a = params["moe.wq_a"]
    assert str(wq_a.result.type) == "tensor<1x32x16xf8E4M3FN>" and not wq_a.bool_prop("trainable")
    assert str(params["moe.wq_a.scale"].result.type) == "tensor<1x2x1xf32>"
    assert str(params["head"].result.type) == "tensor<32x64xf32>"  # excluded: stays
    assert _ops(module, DequantizeOp) and not _ops(module, QuantizeOp)
    assert str(params["moe.experts_gate.scale"].result.type) == "tensor<1x4x2x2xf32>"  # per layer, expert, block
    # then the full recipe reads the stored FP8 weights directly: only activations are quantised (the grouped
    # expert GEMMs quantise inside the quantised dsv3.experts, from the widened weights: the same blocks again)
    run_pipeline(module, "dsv3-fp8-quant{block=16}")
    assert all(next(iter(d.result.uses)).operation in _quantized_experts(module) for d in _ops(module, DequantizeOp))
    for op in _ops(module, FP8MatmulOp):
        assert isinstance(op.x.owner, QuantizeOp) and not isinstance(op.w.owner, QuantizeOp)
    assert parse_ir(print_ir(module)) is not None


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------


def test_fp8_on_a_tpu_is_refused_unless_emulation_is_asked_for():
    spec = dsv3c.parse(SMALL)
    with pytest.raises(UserError, match=r"no FP8 hardware \(int8 only\).*--fp8 emulate"):
        dsv3c.compile(spec, target="tpu-v5p-8", mode="forward", batch=1, seq=8, fp8="native")
    with pytest.raises(UserError, match="FP8 on the CPU is emulated"):
        dsv3c.compile(spec, target="cpu", mode="forward", batch=1, seq=8, fp8="native")


def test_hlo_fp8_gemm_counter():
    hlo = """%fused (p0: f8e4m3fn[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f8e4m3fn[4,8]{1,0} parameter(0)
  %p1 = f8e4m3fn[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %p0 = f32[4,8]{1,0} copy(%a)
  ROOT %dot.2 = f32[4,2]{1,0} dot(%p0, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert fp8_gemms(hlo) == 1


def test_stored_weights_compute_like_full_precision_ones():
    """Weight-only FP8 (and W8A8 over it) on the forward pass, with parameters quantised from the full-precision
    ones; and an HF block-FP8 weight taken over without re-quantisation."""
    spec = dsv3c.parse(MICRO)
    base = dsv3c.compile(spec, mode="forward", batch=2, seq=16)
    params = base.init_params(0)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 16))
    reference = np.asarray(base.forward(params, tokens))
    stored_only = "dsv3-drop-mtp,dsv3-fp8-quant{block=16 weights_only=true}"
    for pipeline, bound in ((stored_only, 0.05), (stored_only + ",dsv3-fp8-quant{block=16}", 0.07)):
        prog = dsv3c.compile(spec, mode="forward", batch=2, seq=16, pipeline=pipeline)
        assert prog.infos["moe.experts_gate"].dtype == jnp.float8_e4m3fn
        assert prog.infos["moe.experts_gate.scale"].shape == (1, 4, 2, 2)  # [layers, experts, 32/16, 32/16]
        logits = np.asarray(prog.forward(store_fp8(params, prog.infos, 16), tokens))
        rel = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
        assert 1e-4 < rel < bound, (pipeline, rel)

    rng = np.random.default_rng(5)
    hf_w = rng.standard_normal((200, 300)).astype(ml_dtypes.float8_e4m3fn)  # [out, in], as HF stores it
    hf_scale = rng.random((2, 3)).astype(F32)  # [ceil(out/128), ceil(in/128)]
    values, scales = from_hf_block_fp8(hf_w, hf_scale)
    hf_dense = hf_w.astype(F32) * np.repeat(np.repeat(hf_scale, 128, 0), 128, 1)[:200, :300]
    ours = np.asarray(jax.jit(ir_dequantize(300, 200, 128))(values, scales)[0])
    np.testing.assert_array_equal(ours, hf_dense.T)


def ir_dequantize(k: int, n: int, block: int):
    kb, nb = math.ceil(k / block), math.ceil(n / block)
    q = quant("e4m3", f"[{block}, {block}]")
    return ir_function(f"""builtin.module {{
  func.func @f(%v: tensor<{k}x{n}xf8E4M3FN>, %s: tensor<{kb}x{nb}xf32>) -> tensor<{k}x{n}xf32> {{
    %w = dsv3.dequantize %v, %s {{quant = {q}}} : (tensor<{k}x{n}xf8E4M3FN>, tensor<{kb}x{nb}xf32>) -> tensor<{k}x{n}xf32>
    func.return %w : tensor<{k}x{n}xf32>
  }}
}}""")  # noqa: E501


# ---------------------------------------------------------------------------------------------------------------
# Whole programs: training on the CPU, FP8 GEMMs on a GPU compiled ahead of time
# ---------------------------------------------------------------------------------------------------------------

MICRO = SMALL.replace("layers 2 { dense_first 1 }", "layers 1").replace("  mtp { depth 1 }\n", "")


def test_fp8_training_follows_full_precision_training():
    spec = dsv3c.parse(MICRO)
    losses = {}
    # with DeepSeek-V3's recompute policy, which tags (and keeps) the FP8 activations for the backward pass
    remat = "dsv3-remat{policy=deepseek}"
    for name, pipeline in (("f32", remat), ("fp8", f"dsv3-fp8-quant{{block=16}},{remat}")):
        prog = dsv3c.compile(spec, mode="train", batch=8, seq=32, pipeline=pipeline, steps=30)
        assert prog.report["fp8"]["mode"] == ("emulated" if name == "fp8" else "off")
        losses[name] = np.array(train(prog, 30, SyntheticStream(64, 0), seed=0).losses())
    f32, fp8 = losses["f32"], losses["fp8"]
    assert abs(fp8[0] - f32[0]) / f32[0] < 1e-3  # same initial model: only quantisation differs
    assert f32[-1] < 0.7 * f32[0]  # the run learns...
    assert abs(fp8[-1] - f32[-1]) / f32[-1] < 0.05, (f32[-1], fp8[-1])  # ...and FP8 learns as much


def _fp8_dots(hlo: str) -> list[str]:
    """op_name metadata of every dot/custom call on FP8 operands in compiled HLO (operand types are looked up in
    the instruction's own computation)."""
    instruction = re.compile(r"^(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(([^)]*)\)")
    names, types = [], {}
    for line in hlo.splitlines():
        line = line.strip()
        if line.endswith("{"):  # a computation starts: its parameters are named in its header
            types = dict(re.findall(r"([\w.-]+): (\w+)\[", line))
            continue
        match = instruction.match(line)
        if not match:
            continue
        name, ty, opcode, operands = match.groups()
        types[name] = ty.split("[")[0]
        if opcode in ("dot", "custom-call"):
            if any(types.get(o.strip().lstrip("%"), "").startswith("f8") for o in operands.split(",")):
                names.append(re.search(r'op_name="([^"]*)"', line).group(1))
    return names


def test_gpu_target_compiles_fp8_gemms_forward_and_backward(tmp_path):
    pytest.importorskip("jax_plugins.xla_cuda12")
    spec_path = tmp_path / "micro.dsv3"
    spec_path.write_text(MICRO)
    report = tmp_path / "r.json"
    assert main([
        "compile", str(spec_path), "--target", "gpu-h100", "--mode", "train", "--batch", "2", "--seq", "128",
        "--fp8", "native", "--report", str(report), "--dump-ir", str(tmp_path / "dumps"),
    ]) == 0
    fp8 = json.loads(report.read_text())["fp8"]
    assert fp8["mode"] == "native" and fp8["matmuls"] == 8 and fp8["experts"] == 1, fp8
    assert "Pallas" in fp8["why"]
    hlo = next((tmp_path / "dumps").glob("*-compiled.hlo.txt")).read_text()
    dots = _fp8_dots(hlo)
    assert fp8["compiled_fp8_gemms"] == len(dots)
    # On one H100 every block-scaled GEMM is a Triton call of the Pallas kernels (runtime/kernels/fp8_gemm.py):
    # the 8 dense GEMMs and the 3 expert GEMMs forward; dX and dW of each dense one, d(rows) and the per-expert dW
    # of each expert GEMM backward (the experts' forward again too: DeepSeek's recompute policy recomputes it).
    kernels = Counter(("bwd" if "transpose(" in d else "fwd", d.split("/")[-2]) for d in dots)
    assert kernels == {("fwd", "fp8_block_scaled_matmul"): 8, ("fwd", "fp8_block_scaled_grouped_matmul"): 3,
                       ("bwd", "fp8_block_scaled_matmul"): 16, ("bwd", "fp8_block_scaled_grouped_matmul"): 6,
                       ("bwd", "fp8_block_scaled_grouped_weight_grad"): 3}, kernels
    assert all('custom_call_target="__gpu$xla.gpu.triton"' in line for line in hlo.splitlines() if "pallas_call" in line
               and " custom-call(" in line)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("#dsv3.quant<f8E4M3FN, [1, 32], amax>", "#dsv3.quant<f16, [1, 32], amax>"), "f16 is not an FP8 type"),
        (("#dsv3.quant<f8E4M3FN, [1, 32], amax>", "#dsv3.quant<f8E4M3FN, [1, 32], max>"), "scale rule must be one of"),
        (("tensor<2x1xf32>", "tensor<2x2xf32>"), "w scales are 2x2, expected 2x1"),
        (("grad_quant = #dsv3.quant<f8E4M3FN, [1, 32]", "grad_quant = #dsv3.quant<f8E4M3FN, [1, 16]"),
         "the dY tile (16) must equal the weight's block width (32)"),
    ],
)
def test_bad_fp8_ir_is_reported_where_it_is(edit, message):
    text = linear_ir(8, 64, 32, 32)
    with pytest.raises(dsv3c.SpecError, match=re.escape(message)) as info:
        parse_ir(text.replace(*edit), "q.mlir")
    assert info.value.line > 0
