"""FP8 quantisation in the dsv3 dialect: the `#dsv3.quant` attribute and the ops `dsv3-fp8-quant` inserts.

DeepSeek-V3 runs every Linear GEMM in FP8 with fine-grained scales (REFERENCE.md section 5): activations get one
scale per 1x128 tile along the contraction axis, weights one per 128x128 block, and partial sums are promoted to
FP32 every 128 elements of K. The IR states all of it: `#dsv3.quant<f8E4M3FN, [1, 128], amax>` says which FP8
format, which tile shares a scale, and how the scale is chosen, so a dump shows exactly what will be computed and a
hand edit (a different tile, E5M2 gradients) changes the program.

Ops:
- `dsv3.quantize`: x -> (FP8 values, f32 scales), `x ~= values * scale` per tile;
- `dsv3.dequantize`: the inverse (weight-only FP8 inference keeps weights in FP8 storage and widens them here);
- `dsv3.fp8_matmul`: the dequantised product of two quantised operands, FP8 products accumulated in FP32 per
  K-block and scaled into the result; its backward GEMMs run in FP8 too (`grad_quant`);
The routed experts are not a separate op: `dsv3.experts` carries the same three attributes when its grouped GEMMs
run in FP8 (an optional attribute, so nothing else the op carries is lost when the pass quantises it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xdsl.dialects.builtin import (
    Float32Type,
    TensorType,
)
from xdsl.ir import Attribute, SSAValue
from xdsl.irdl import (
    irdl_op_definition,
    operand_def,
    prop_def,
    result_def,
    traits_def,
)
from xdsl.traits import Pure
from xdsl.utils.exceptions import VerifyException

from .dsv3 import DYN, _fmt, _Op, _same_shape, shape_of
from .quant_attr import FP8_MAX, FP8_TYPES, SCALE_RULES, QuantAttr, check_tiling, fp8_name

__all__ = [
    "FP8_MAX", "FP8_TYPES", "SCALE_RULES", "DequantizeOp", "FP8MatmulOp", "QuantAttr", "QuantizeOp", "fp8_name",
    "scale_shape",
]

def scale_shape(shape: Sequence[int], quant: QuantAttr) -> tuple[int, ...]:
    """The shape of the scales of a tensor quantised by `quant`: one entry per tile. Tiles of one row (or of the
    whole tensor) read an activation's leading axes as rows, so a dynamic (batch, sequence) axis is fine; taller
    tiles need a weight: its last two axes are the matrix, any before them (experts) index separate matrices."""
    *lead, last = shape
    cols = 1 if quant.cols == 0 else math.ceil(last / quant.cols)
    if quant.rows == 0:
        return (*(1 for _ in lead), cols)
    if quant.rows == 1:
        return (*lead, cols)
    if not lead or lead[-1] == DYN:
        raise VerifyException(f"a {quant.rows}-row tile needs a static matrix, got {_fmt(shape)}")
    return (*lead[:-1], math.ceil(lead[-1] / quant.rows), cols)


def _check_quantised(op: _Op, values: SSAValue, scales: SSAValue, quant: QuantAttr, what: str) -> None:
    """`values` hold `quant`'s FP8 type and `scales` are f32 with one entry per tile."""
    op.expect(
        isinstance(values.type, TensorType) and values.type.element_type == quant.dtype,
        f"{what} must hold {quant.dtype}, got {values.type}",
    )
    expected = scale_shape(shape_of(values), quant)
    got = shape_of(scales)
    op.expect(
        isinstance(scales.type, TensorType) and isinstance(scales.type.element_type, Float32Type),
        f"{what} scales must be f32",
    )
    op.expect(_same_shape(got, expected), f"{what} scales are {_fmt(got)}, expected {_fmt(expected)} for {quant}")


@irdl_op_definition
class QuantizeOp(_Op):
    """x -> (values, scales) with x ~= values * scale on every tile of `quant`. Values are x / scale rounded to
    the FP8 type (saturating at its largest finite value); scales are f32 multipliers (what DeepSeek's checkpoints
    call `weight_scale_inv`)."""

    name = "dsv3.quantize"
    x = operand_def(TensorType)
    quant = prop_def(QuantAttr)
    values = result_def(TensorType)
    scales = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, quant: QuantAttr):
        shape = shape_of(x)
        super().__init__(
            operands=[x],
            result_types=[TensorType(quant.dtype, shape), TensorType(Float32Type(), scale_shape(shape, quant))],
            properties={"quant": quant},
        )

    def verify_(self) -> None:
        self.expect(_same_shape(shape_of(self.values), shape_of(self.x)), "values must have the input's shape")
        _check_quantised(self, self.values, self.scales, self.quant, "values")


@irdl_op_definition
class DequantizeOp(_Op):
    """values * scale per tile, in the result's dtype (FP8 weights stored with block scales, widened for use)."""

    name = "dsv3.dequantize"
    values = operand_def(TensorType)
    scales = operand_def(TensorType)
    quant = prop_def(QuantAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, values: SSAValue, scales: SSAValue, quant: QuantAttr, dtype: Attribute):
        """`dtype` is the wide float type the values are restored to."""
        super().__init__(
            operands=[values, scales], result_types=[TensorType(dtype, shape_of(values))], properties={"quant": quant}
        )

    def verify_(self) -> None:
        _check_quantised(self, self.values, self.scales, self.quant, "values")
        self.expect(_same_shape(shape_of(self.result), shape_of(self.values)), "result must have the values' shape")


@irdl_op_definition
class FP8MatmulOp(_Op):
    """x[..., k] @ w[k, n] from quantised operands: FP8 x FP8 products, summed in FP32 over each K-block (the
    `x_quant` tile width, which must equal the `w_quant` tile height), each block's sum multiplied by its x and w
    scales and accumulated in FP32, the result cast to the result type. Per-tensor operands (`tensor` tiles) make
    one FP8 GEMM scaled once.

    Backward: the gradient dY is quantised by `grad_quant` (1 x n-block tiles) for the input gradient
    dY @ w^T (w's blocks are square, so w^T reuses them); for the weight gradient x^T @ dY both x (dequantised from
    its FP8 values, as DeepSeek-V3 re-tiles its cached FP8 activations) and dY are quantised in the transposed
    tiling, `rows x 1` with rows = the n-block. Gradients flow straight through `dsv3.quantize` to its input; an
    operand read from FP8 storage (a checkpoint's weights) gets none."""

    name = "dsv3.fp8_matmul"
    x = operand_def(TensorType)
    x_scales = operand_def(TensorType)
    w = operand_def(TensorType)
    w_scales = operand_def(TensorType)
    x_quant = prop_def(QuantAttr)
    w_quant = prop_def(QuantAttr)
    grad_quant = prop_def(QuantAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, x: SSAValue, x_scales: SSAValue, w: SSAValue, w_scales: SSAValue, result_type: Attribute, *,
        x_quant: QuantAttr, w_quant: QuantAttr, grad_quant: QuantAttr,
    ):
        """`result_type` is the type of the matmul this one replaces."""
        super().__init__(
            operands=[x, x_scales, w, w_scales], result_types=[result_type],
            properties={"x_quant": x_quant, "w_quant": w_quant, "grad_quant": grad_quant},
        )

    def verify_(self) -> None:
        xs, ws, rs = shape_of(self.x), shape_of(self.w), shape_of(self.result)
        self.expect(len(ws) == 2, f"weight must be 2-D, got {_fmt(ws)}")
        self.expect(xs[-1] == ws[0], f"contracts {_fmt(xs)} with {_fmt(ws)}: {xs[-1]} != {ws[0]}")
        self.expect(_same_shape(rs, (*xs[:-1], ws[1])), f"result {_fmt(rs)} should be {_fmt((*xs[:-1], ws[1]))}")
        _check_quantised(self, self.x, self.x_scales, self.x_quant, "x")
        _check_quantised(self, self.w, self.w_scales, self.w_quant, "w")
        check_tiling(self, self.x_quant, self.w_quant, self.grad_quant)


QUANT_OPS = [QuantizeOp, DequantizeOp, FP8MatmulOp]
QUANT_ATTRS = [QuantAttr]
