"""Lowering of the FP8 ops: quantise, dequantise, FP8 matmul and FP8 experts, each GEMM with an FP8 backward.

`dsv3.fp8_matmul` and the grouped GEMMs of a quantised `dsv3.experts` lower to `jax.custom_vjp` functions whose
backward pass runs its two GEMMs in FP8 as well (REFERENCE.md section 5): the input gradient dY @ W^T with dY
quantised per 1 x 128 tile and W^T reusing W's square blocks, the weight gradient X^T @ dY with X (dequantised from
the FP8 values saved in the forward pass, as DeepSeek-V3 caches them) and dY re-quantised per 128 x 1 tile, so that
each tile again runs along the contraction axis. Only the FP8 values and their scales are saved for the backward pass.

Gradients pass straight through quantisation: when an FP8 operand comes from `dsv3.quantize`, its gradient goes to
the quantised tensor; an operand stored in FP8 (a checkpoint's weights) gets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from xdsl.ir import SSAValue

from ...dialects import dsv3, quant
from ...dialects.remat import CheckpointOp
from ...dialects.sharding import ShardOp
from .. import fp8
from .dtypes import result_dtype
from .experts import GroupedGemm
from .registry import LoweringContext, register_lowering


def tiling(attr: quant.QuantAttr) -> fp8.Tiling:
    """The runtime mirror of a `#dsv3.quant` attribute."""
    return fp8.Tiling(attr.fmt, attr.rows, attr.cols, attr.pow2)


@dataclass(frozen=True)
class Recipe:
    """Everything static about one FP8 GEMM: operand and gradient tilings, backend, and the dtypes to return."""

    x: fp8.Tiling
    w: fp8.Tiling
    grad: fp8.Tiling
    backend: str
    out_dtype: np.dtype
    x_dtype: np.dtype | None  # None: x is not differentiated (read from FP8 storage)
    w_dtype: np.dtype | None

    def backward_tilings(self) -> tuple[fp8.Tiling, fp8.Tiling, fp8.Tiling, fp8.Tiling]:
        """(dY for the input gradient, W^T, X^T and dY for the weight gradient). The weight gradient contracts
        over tokens, so its tiles run along them: X^T per 1 x b (X per b x 1) and dY per b x 1, b the K-block."""
        if self.x.per_tensor:
            return self.grad, self.w, self.x, self.grad
        block = self.x.cols
        return (
            self.grad, self.w.transposed(), self.x.with_tile(1, block), self.grad.with_tile(block, 1),
        )


# ---------------------------------------------------------------------------------------------------------------
# Dense FP8 linear
# ---------------------------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_linear(recipe: Recipe, x_src, w_src, xq, xs, wq, ws) -> jax.Array:
    """xq [M, K] @ wq [K, N] block-scaled, in `recipe.out_dtype`. `x_src`/`w_src` are the tensors the FP8 operands
    were quantised from: their values are not read, they receive the gradients."""
    return fp8.blocked_matmul(xq, xs, recipe.x, wq, ws, recipe.w, recipe.backend).astype(recipe.out_dtype)


def _linear_fwd(recipe: Recipe, x_src, w_src, xq, xs, wq, ws):
    return fp8_linear(recipe, x_src, w_src, xq, xs, wq, ws), (xq, xs, wq, ws)


def _linear_bwd(recipe: Recipe, residuals, g):
    xq, xs, wq, ws = residuals
    t_dy, t_wt, t_xt, t_dy2 = recipe.backward_tilings()
    dx = dw = None
    if recipe.x_dtype is not None:
        gq, gs = fp8.quantize(g, t_dy)
        dx = fp8.blocked_matmul(gq, gs, t_dy, wq.T, ws.T, t_wt, recipe.backend).astype(recipe.x_dtype)
    if recipe.w_dtype is not None:
        if recipe.x.per_tensor:  # the per-tensor scale of X is also X^T's
            xtq, xts = xq.T, xs
        else:
            xtq, xts = fp8.quantize(fp8.dequantize(xq, xs, recipe.x).T, t_xt)
        gq2, gs2 = fp8.quantize(g, t_dy2)
        dw = fp8.blocked_matmul(xtq, xts, t_xt, gq2, gs2, t_dy2, recipe.backend).astype(recipe.w_dtype)
    return dx, dw, None, None, None, None


fp8_linear.defvjp(_linear_fwd, _linear_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Grouped (expert) FP8 linear
# ---------------------------------------------------------------------------------------------------------------


def _quantize_experts(w: jax.Array, t: fp8.Tiling) -> tuple[jax.Array, jax.Array]:
    """Each expert's [K, N] weight quantised on its own."""
    return jax.vmap(lambda we: fp8.quantize(we, t))(w)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_grouped_linear(recipe: Recipe, rows, w, rq, rs, wq, ws, group_sizes) -> jax.Array:
    """rows [T, K] sorted by expert @ w [E, K, N] per group, from their FP8 values (rq, rs: per row tile; wq, ws:
    per block of each expert). Like `fp8_linear`, `rows` and `w` only receive the gradients: the FP8 operands are
    computed outside, so that a recompute policy can recompute them rather than keep them (a custom VJP's own
    intermediates would always be kept: for the experts, an FP8 copy of every layer's weights)."""
    return fp8.blocked_ragged_matmul(rq, rs, recipe.x, wq, ws, recipe.w, group_sizes, recipe.backend).astype(
        recipe.out_dtype
    )


def _grouped_fwd(recipe: Recipe, rows, w, rq, rs, wq, ws, group_sizes):
    return fp8_grouped_linear(recipe, rows, w, rq, rs, wq, ws, group_sizes), (rq, rs, wq, ws, group_sizes)


def _grouped_bwd(recipe: Recipe, residuals, g):
    rq, rs, wq, ws, group_sizes = residuals
    t_dy, t_wt, t_xt, t_dy2 = recipe.backward_tilings()
    gq, gs = fp8.quantize(g, t_dy)
    d_rows = fp8.blocked_ragged_matmul(
        gq, gs, t_dy, wq.transpose(0, 2, 1), ws.transpose(0, 2, 1), t_wt, group_sizes, recipe.backend
    )
    x = fp8.dequantize(rq, rs, recipe.x)
    dw = fp8.grouped_weight_grad(x, g, group_sizes, wq.shape[0], t_xt.transposed(), t_dy2, recipe.backend)
    return d_rows.astype(recipe.x_dtype), dw.astype(recipe.w_dtype), None, None, None, None, None


fp8_grouped_linear.defvjp(_grouped_fwd, _grouped_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------------


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _scales_2d(scales: jax.Array, t: fp8.Tiling) -> jax.Array:
    """Scales of an activation [..., K/kb] as the matrix [rows, K/kb] the 2-D kernels take."""
    return scales.reshape(1, -1) if t.rows == 0 else _flatten(scales)


def _quantize_nd(x: jax.Array, t: fp8.Tiling) -> tuple[jax.Array, jax.Array]:
    """`fp8.quantize` on the IR's shapes: an activation's leading axes are rows (per-row or whole-tensor tiles);
    a weight with taller tiles is a matrix, or a stack of them (experts) quantised one by one."""
    if t.rows in (0, 1):
        values, scales = fp8.quantize(_flatten(x), t)
        lead = x.shape[:-1] if t.rows == 1 else (1,) * (x.ndim - 1)
        return values.reshape(x.shape), scales.reshape(*lead, scales.shape[-1])
    matrices = x.reshape(-1, *x.shape[-2:])
    values, scales = jax.vmap(lambda m: fp8.quantize(m, t))(matrices)
    return values.reshape(x.shape), scales.reshape(*x.shape[:-2], *scales.shape[-2:])


def _dequantize_nd(values: jax.Array, scales: jax.Array, t: fp8.Tiling) -> jax.Array:
    if t.rows in (0, 1):
        return fp8.dequantize(_flatten(values), scales.reshape(-1, scales.shape[-1]), t).reshape(values.shape)
    matrices = values.reshape(-1, *values.shape[-2:])
    blocks = scales.reshape(-1, *scales.shape[-2:])
    return jax.vmap(lambda v, s: fp8.dequantize(v, s, t))(matrices, blocks).reshape(values.shape)


@register_lowering(quant.QuantizeOp)
def _quantize(op: quant.QuantizeOp, args, ctx: LoweringContext):
    return list(_quantize_nd(args[0], tiling(op.quant)))


@register_lowering(quant.DequantizeOp)
def _dequantize(op: quant.DequantizeOp, args, ctx: LoweringContext):
    return [_dequantize_nd(*args, tiling(op.quant)).astype(result_dtype(op.result))]


_IDENTITIES = (CheckpointOp, ShardOp)
"""Ops that pass a value on unchanged (a recompute tag, a layout constraint): an FP8 operand is traced through
them to the `dsv3.quantize` that made it."""


def _source(value: SSAValue, ctx: LoweringContext) -> jax.Array | None:
    """The high-precision tensor an FP8 operand was quantised from, when the IR says (a `dsv3.quantize`)."""
    owner = value.owner
    while isinstance(owner, _IDENTITIES):
        owner = owner.x.owner
    if isinstance(owner, quant.QuantizeOp):
        return ctx.env[owner.x]
    return None


@register_lowering(quant.FP8MatmulOp)
def _fp8_matmul(op: quant.FP8MatmulOp, args, ctx: LoweringContext):
    xq, xs, wq, ws = (lax.stop_gradient(a) for a in args)
    x_src, w_src = _source(op.x, ctx), _source(op.w, ctx)
    out_dtype = result_dtype(op.result)
    recipe = Recipe(
        tiling(op.x_quant), tiling(op.w_quant), tiling(op.grad_quant), ctx.fp8_backend, out_dtype,
        None if x_src is None else x_src.dtype, None if w_src is None else _weight_grad_dtype(w_src, out_dtype, ctx),
    )
    placeholder = jnp.zeros((), jnp.float32)  # stands for an operand that takes no gradient
    lead = xq.shape[:-1]
    y = fp8_linear(
        recipe,
        placeholder if x_src is None else _flatten(x_src), placeholder if w_src is None else w_src,
        _flatten(xq), _scales_2d(xs, recipe.x), wq, ws,
    )
    return [y.reshape(*lead, y.shape[-1])]


def fp8_grouped_gemm(recipe: Recipe) -> GroupedGemm:
    """A drop-in for `lax.ragged_dot` in the routed experts: the same grouped GEMM with FP8 operands."""

    def gemm(rows: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
        r = Recipe(recipe.x, recipe.w, recipe.grad, recipe.backend, rows.dtype, rows.dtype, w.dtype)
        quantised = (*fp8.quantize(rows, recipe.x), *_quantize_experts(w, recipe.w))
        return fp8_grouped_linear(r, rows, w, *(lax.stop_gradient(q) for q in quantised), group_sizes)

    return gemm


def fp8_expert_gemm(op: dsv3.ExpertsOp, ctx: LoweringContext) -> GroupedGemm:
    """The grouped GEMM of a `dsv3.experts` whose quantisation attributes are set."""
    assert op.x_quant is not None and op.w_quant is not None and op.grad_quant is not None
    recipe = Recipe(
        tiling(op.x_quant), tiling(op.w_quant), tiling(op.grad_quant), ctx.fp8_backend, result_dtype(op.result),
        None, None,
    )
    return fp8_grouped_gemm(recipe)


def _weight_grad_dtype(w: jax.Array, compute: np.dtype, ctx: LoweringContext) -> np.dtype:
    """The dtype an FP8 GEMM returns its weight's gradient in: the compute dtype when the optimizer holds gradients
    in it (`grads = "compute"`, as `runtime/lower/weights.py` does for the other GEMMs: the layer scans then stack
    bf16 gradients, not f32 ones), else the weight's own."""
    return np.dtype(compute) if ctx.grads_in_compute_dtype and jnp.issubdtype(compute, jnp.floating) else w.dtype
