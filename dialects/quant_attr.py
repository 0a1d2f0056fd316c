"""The `#dsv3.quant` attribute: how a tensor is quantised to FP8. Its own module because both the FP8 ops
(`quant.py`) and the model-level `dsv3.experts` (which carries it when its grouped GEMMs run in FP8) use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from xdsl.dialects.builtin import ArrayAttr, Float8E4M3FNType, Float8E5M2Type, IntAttr, StringAttr
from xdsl.ir import Attribute, ParametrizedAttribute
from xdsl.irdl import irdl_attr_definition
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

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


class _Expecting(Protocol):
    def expect(self, condition: bool, message: str) -> None: ...


def check_tiling(op: _Expecting, xq: QuantAttr, wq: QuantAttr, gq: QuantAttr) -> None:
    """The three tilings describe one consistent recipe: all per-tensor, or 1 x b activation tiles, b x b weight
    blocks and 1 x b gradient tiles (the K-block of each GEMM is then b)."""
    if xq.per_tensor or wq.per_tensor or gq.per_tensor:
        op.expect(xq.per_tensor and wq.per_tensor and gq.per_tensor, "per-tensor scaling must apply to x, w and dY")
        return
    op.expect(xq.rows == 1 and gq.rows == 1, "activation and gradient tiles must be one row high (1 x block)")
    op.expect(xq.cols == wq.rows, f"the K-block of x ({xq.cols}) must equal the weight's block height ({wq.rows})")
    op.expect(gq.cols == wq.cols, f"the dY tile ({gq.cols}) must equal the weight's block width ({wq.cols})")
