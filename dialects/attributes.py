"""Attributes of the dsv3 dialect that carry compiler decisions."""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import ArrayAttr, StringAttr
from xdsl.ir import ParametrizedAttribute
from xdsl.irdl import irdl_attr_definition, param_def
from xdsl.parser import AttrParser
from xdsl.printer import Printer


@irdl_attr_definition
class ShardingAttr(ParametrizedAttribute):
    """How a tensor is laid out on the mesh: for each dimension, the mesh axes it is split over (major to minor),
    `{}` for replicated. Written like Shardy's dimension shardings: `#dsv3.sharding<[{"fsdp"}, {}, {"tensor"}]>`."""

    name = "dsv3.sharding"
    dims: ArrayAttr[ArrayAttr[StringAttr]] = param_def(ArrayAttr[ArrayAttr[StringAttr]])

    @staticmethod
    def from_axes(dims: Sequence[Sequence[str]]) -> ShardingAttr:
        return ShardingAttr(ArrayAttr([ArrayAttr([StringAttr(a) for a in axes]) for axes in dims]))

    @property
    def axes(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(a.data for a in dim.data) for dim in self.dims.data)

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> list[ArrayAttr]:
        def dim() -> ArrayAttr[StringAttr]:
            names = parser.parse_comma_separated_list(parser.Delimiter.BRACES, parser.parse_str_literal)
            return ArrayAttr([StringAttr(n) for n in names])

        parser.parse_punctuation("<")
        dims = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, dim)
        parser.parse_punctuation(">")
        return [ArrayAttr(dims)]

    def print_parameters(self, printer: Printer) -> None:
        dims = ", ".join("{" + ", ".join(f'"{a}"' for a in axes) + "}" for axes in self.axes)
        printer.print_string(f"<[{dims}]>")
