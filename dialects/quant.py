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
- `dsv3.fp8_experts`: `dsv3.experts` with its three grouped GEMMs quantised the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xdsl.dialects.builtin import (
    ArrayAttr,
    Float8E4M3FNType,
    Float8E5M2Type,
    Float32Type,
    FloatAttr,
    IntAttr,
    StringAttr,
    TensorType,
)
from xdsl.ir import Attribute, ParametrizedAttribute, SSAValue
from xdsl.irdl import (
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    result_def,
    traits_def,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.traits import Pure
from xdsl.utils.exceptions import VerifyException

from .dsv3 import DYN, _fmt, _Op, _same_shape, shape_of

FP8_TYPES: dict[str, type[Attribute]] = {"e4m3": Float8E4M3FNType, "e5m2": Float8E5M2Type}
"""Short format names (pass options, reports) to the IR's FP8 element types."""

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
"""The largest finite value of each format: a tile's amax maps onto it."""

SCALE_RULES = ("amax", "pow2")


def fp8_name(element_type: Attribute) -> str | None:
    """`e4m3`/`e5m2` for an FP8 element type, None for anything else."""
    for name, cls in FP8_TYPES.items():
        if isinstance(element_type, cls):
            return name
    return None


@irdl_attr_definition
class QuantAttr(ParametrizedAttribute):
    """How a tensor is quantised: `#dsv3.quant<FP8 type, [rows, cols], rule>`.

    The tensor is read as a matrix (the leading axes of an activation flattened into rows, its last axis the
    columns); every `rows x cols` tile shares one f32 scale (0 means the whole axis: `tensor` is `[0, 0]`, one scale
    for everything, the common per-tensor recipe). `amax` sets scale = amax / FP8_MAX, DeepSeek-V3's online rule;
    `pow2` rounds that scale up to a power of two, so scaling and unscaling are exact. Edges that a tile does not
    fill are padded with zeros, which changes neither amax nor any dot product."""

    name = "dsv3.quant"

    dtype: Attribute
    tile: ArrayAttr[IntAttr]
    rule: StringAttr

    def __init__(self, fmt: str, tile: Sequence[int], rule: str = "amax"):
        super().__init__(FP8_TYPES[fmt](), ArrayAttr([IntAttr(t) for t in tile]), StringAttr(rule))

    @property
    def fmt(self) -> str:
        name = fp8_name(self.dtype)
        assert name is not None
        return name

    @property
    def rows(self) -> int:
        return self.tile.data[0].data

    @property
    def cols(self) -> int:
        return self.tile.data[1].data

    @property
    def per_tensor(self) -> bool:
        return self.rows == 0 and self.cols == 0

    @property
    def pow2(self) -> bool:
        return self.rule.data == "pow2"

    def verify(self) -> None:
        if fp8_name(self.dtype) is None:
            raise VerifyException(f"#dsv3.quant: {self.dtype} is not an FP8 type (f8E4M3FN or f8E5M2)")
        if len(self.tile.data) != 2 or any(t.data < 0 for t in self.tile.data):
            raise VerifyException("#dsv3.quant: the tile is [rows, cols] with sizes >= 0 (0: the whole axis)")
        if self.rule.data not in SCALE_RULES:
            raise VerifyException(f"#dsv3.quant: scale rule must be one of {', '.join(SCALE_RULES)}")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> list[Attribute]:
        """`<f8E4M3FN, [1, 128], amax>` or `<f8E4M3FN, tensor, pow2>`; mistakes are reported where they are."""
        with parser.in_angle_brackets():
            start = parser.pos
            dtype = parser.parse_type()
            if fp8_name(dtype) is None:
                parser.raise_error(f"{dtype} is not an FP8 type (f8E4M3FN or f8E5M2)", start, parser.pos)
            parser.parse_punctuation(",")
            start = parser.pos
            if parser.parse_optional_keyword("tensor"):
                tile = [0, 0]
            else:
                tile = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parser.parse_integer)
                if len(tile) != 2 or min(tile) < 0:
                    parser.raise_error("a tile is [rows, cols] with sizes >= 0 (0: the whole axis)", start, parser.pos)
            parser.parse_punctuation(",")
            start = parser.pos
            rule = parser.parse_identifier("scale rule (amax or pow2)")
            if rule not in SCALE_RULES:
                parser.raise_error(f"scale rule must be one of {', '.join(SCALE_RULES)}", start, parser.pos)
        return [dtype, ArrayAttr([IntAttr(t) for t in tile]), StringAttr(rule)]

    def print_parameters(self, printer: Printer) -> None:
        with printer.in_angle_brackets():
            printer.print_attribute(self.dtype)
            tile = "tensor" if self.per_tensor else f"[{self.rows}, {self.cols}]"
            printer.print_string(f", {tile}, {self.rule.data}")


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

    def verify_(self) -> None:
        xs, ws, rs = shape_of(self.x), shape_of(self.w), shape_of(self.result)
        self.expect(len(ws) == 2, f"weight must be 2-D, got {_fmt(ws)}")
        self.expect(xs[-1] == ws[0], f"contracts {_fmt(xs)} with {_fmt(ws)}: {xs[-1]} != {ws[0]}")
        self.expect(_same_shape(rs, (*xs[:-1], ws[1])), f"result {_fmt(rs)} should be {_fmt((*xs[:-1], ws[1]))}")
        _check_quantised(self, self.x, self.x_scales, self.x_quant, "x")
        _check_quantised(self, self.w, self.w_scales, self.w_quant, "w")
        _check_tiling(self, self.x_quant, self.w_quant, self.grad_quant)


def _check_tiling(op: _Op, xq: QuantAttr, wq: QuantAttr, gq: QuantAttr) -> None:
    """The three tilings describe one consistent recipe: all per-tensor, or 1 x b activation tiles, b x b weight
    blocks and 1 x b gradient tiles (the K-block of each GEMM is then b)."""
    if xq.per_tensor or wq.per_tensor or gq.per_tensor:
        op.expect(xq.per_tensor and wq.per_tensor and gq.per_tensor, "per-tensor scaling must apply to x, w and dY")
        return
    op.expect(xq.rows == 1 and gq.rows == 1, "activation and gradient tiles must be one row high (1 x block)")
    op.expect(xq.cols == wq.rows, f"the K-block of x ({xq.cols}) must equal the weight's block height ({wq.rows})")
    op.expect(gq.cols == wq.cols, f"the dY tile ({gq.cols}) must equal the weight's block width ({wq.cols})")


@irdl_op_definition
class FP8ExpertsOp(_Op):
    """`dsv3.experts` with FP8 grouped GEMMs: each routed row is quantised per `x_quant` tile, each expert's
    weights per `w_quant` block, and the three GEMMs (gate, up, down) and their backward GEMMs run as in
    `dsv3.fp8_matmul`. For the weight gradient, each expert's rows are padded to whole row tiles so that no scale
    is shared between two experts. Gate weights and the final combination stay in FP32."""

    name = "dsv3.fp8_experts"
    x = operand_def(TensorType)
    weights = operand_def(TensorType)
    indices = operand_def(TensorType)
    w_gate = operand_def(TensorType)
    w_up = operand_def(TensorType)
    w_down = operand_def(TensorType)
    x_quant = prop_def(QuantAttr)
    w_quant = prop_def(QuantAttr)
    grad_quant = prop_def(QuantAttr)
    capacity_factor = opt_prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def verify_(self) -> None:
        dim = shape_of(self.x)[-1]
        g, u, d = shape_of(self.w_gate), shape_of(self.w_up), shape_of(self.w_down)
        self.expect(len(g) == 3 and g == u, "w_gate and w_up must both be [experts, dim, hidden]")
        self.expect(g[1] == dim, f"expert input width {g[1]} != {dim}")
        self.expect(d == (g[0], g[2], dim), f"w_down must be [{g[0]}, {g[2]}, {dim}], got {_fmt(d)}")
        self.expect(shape_of(self.weights)[-1] == shape_of(self.indices)[-1], "weights and indices disagree on top_k")
        _check_tiling(self, self.x_quant, self.w_quant, self.grad_quant)


QUANT_OPS = [QuantizeOp, DequantizeOp, FP8MatmulOp, FP8ExpertsOp]
QUANT_ATTRS = [QuantAttr]
