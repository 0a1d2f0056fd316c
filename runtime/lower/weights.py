"""Weights cast to the compute dtype where a GEMM reads them, and the dtype their gradient is held in.

Parameters are stored in f32 and cast at each use. Under bf16 compute a weight's gradient comes out of the backward
GEMM in bf16; JAX's transpose of the cast then widens it to f32 inside the layer scan, so the scan stacks an f32
gradient for every layer: for a model whose parameters are mostly layer weights, that buffer is the largest
temporary of the training step (15 of deepseek3-test's 23 GiB per v5p chip). With the optimizer's
`grads = "compute"` the cast's transpose keeps the GEMM's dtype instead: the stacked buffer is half the size and
holds the same values, and the step widens it where the optimizer reads it, which XLA fuses into the update."""

from __future__ import annotations

import functools

import jax
import numpy as np
from xdsl.ir import BlockArgument, OpResult, SSAValue

from ...dialects import dsv3
from ...dialects.sharding import ShardOp
from .registry import LoweringContext


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cast_keeping_gradient_dtype(w: jax.Array, dtype: np.dtype) -> jax.Array:
    return w.astype(dtype)


def _cast_forward(w: jax.Array, dtype: np.dtype):
    return w.astype(dtype), None


def _cast_backward(dtype: np.dtype, _, cotangent: jax.Array):
    # JAX accepts a cotangent of another float dtype for a float primal (custom_vjp's dtype exception); the train
    # step widens the gradient tree to the parameters' dtypes (`runtime/train.py`).
    return (cotangent,)


_cast_keeping_gradient_dtype.defvjp(_cast_forward, _cast_backward)


def _weight_source(value: SSAValue) -> SSAValue:
    """The parameter (or stacked layer's block argument) behind `value`, through changes of layout."""
    while isinstance(value, OpResult) and isinstance(value.op, ShardOp):
        value = value.op.x
    return value


def _is_weight_read_once(value: SSAValue) -> bool:
    """A parameter, or a layer's slice of a stacked one, that nothing but this op reads (possibly through a change of
    layout, as explicit sharding gathers weights where they are used): its whole gradient comes from one GEMM, so
    keeping that GEMM's dtype rounds nothing (a second reader's gradient would be summed in it)."""
    if not value.has_one_use():
        return False
    if isinstance(value, OpResult) and isinstance(value.op, ShardOp):
        return _is_weight_read_once(value.op.x)
    if isinstance(value, OpResult):
        return isinstance(value.op, dsv3.ParamOp)
    if isinstance(value, BlockArgument):
        return isinstance(value.block.parent_op(), dsv3.LayerStackOp) and value.index > 0
    return False


def cast_weight(operand: SSAValue, w: jax.Array, dtype: np.dtype, ctx: LoweringContext) -> jax.Array:
    """`w` (the value of IR `operand`) in `dtype` for a GEMM; its gradient stays in `dtype` when the optimizer says
    `grads = "compute"` and `operand` is a weight read only here."""
    if w.dtype != dtype and ctx.grads_in_compute_dtype and _is_weight_read_once(operand):
        if ctx.weight_casts is not None:
            ctx.weight_casts[_weight_source(operand)] = np.dtype(dtype)
        return _cast_keeping_gradient_dtype(w, dtype)
    return w.astype(dtype)


def cast_keeping_gradient_dtype(w: jax.Array, dtype: np.dtype) -> jax.Array:
    """`w` in `dtype`, its gradient left in `dtype`: for a caller that casts a weight before `cast_weight` sees it
    (the pipelined step casts a layer's weights outside the conditional that skips padded rows)."""
    return _cast_keeping_gradient_dtype(w, dtype)
