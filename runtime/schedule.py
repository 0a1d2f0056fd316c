"""XLA compiler options from the IR's `dsv3.schedule` declaration."""

from __future__ import annotations

from typing import Any

from xdsl.dialects.builtin import BoolAttr, FloatAttr, IntegerAttr, ModuleOp, StringAttr

from ..dialects.schedule import ScheduleOp


def compiler_options(module: ModuleOp) -> dict[str, Any]:
    """The options the overlap pass chose, as Python values for `Lowered.compile(compiler_options=...)`."""
    options: dict[str, Any] = {}
    for op in module.ops:
        if isinstance(op, ScheduleOp):
            for name, attr in op.options.data.items():
                options[name] = _value(attr)
    return options


def _value(attr: Any) -> Any:
    if isinstance(attr, IntegerAttr) and attr.type == BoolAttr.from_bool(True).type:
        return bool(attr.value.data)
    if isinstance(attr, IntegerAttr | FloatAttr):
        return attr.value.data
    if isinstance(attr, StringAttr):
        return attr.data
    raise TypeError(f"unsupported compiler option value {attr}")
