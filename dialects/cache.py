"""Ops that say what an inference program keeps between steps: caches, their updates, and what is stored back.

A cache is named state that outlives one call of `@model`, declared like a parameter (`dsv3.cache`, with logical
axes and a fill value for empty slots) and written back at the end of the call (`dsv3.cache_store`). Batch and
cache length are dynamic in the IR (`tensor<61x?x?x512xbf16>`) and chosen when the program is compiled or run, as
batch and sequence are for activations. A per-layer cache is a layer stack operand stacked on the `layers` axis, like
a parameter; the region writes its layer's slice with `dsv3.cache_update` and yields the result, which the stack
returns stacked again. So the IR shows, per layer, exactly which values are cached: after `dsv3-mla-absorb`, the
576-wide latent (`c_kv`, `k_pe`) instead of per-head keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import ArrayAttr, IntegerAttr, IntegerType, StringAttr, TensorType
from xdsl.ir import SSAValue
from xdsl.irdl import (
    IRDLOperation,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    result_def,
    traits_def,
)
from xdsl.traits import Pure

from .dsv3 import DYN, _fmt, _Op, _same_shape, shape_of

BATCH_AXIS, SEQ_AXIS = "batch", "cache_seq"
"""The logical axes of a cache that are sized at compile time (batch, and the cache length in tokens)."""


@irdl_op_definition
class CacheOp(_Op):
    """Reads the named cache as it was at the start of the call. `axes` names each dimension (`batch` and
    `cache_seq` are the dynamic ones); empty slots hold `fill` (0 unless given; the position cache uses -1, so
    that an empty slot is never attended to)."""

    name = "dsv3.cache"
    cache_name = prop_def(StringAttr, prop_name="name")
    axes = prop_def(ArrayAttr[StringAttr])
    fill = opt_prop_def(IntegerAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())
    assembly_format = "attr-dict `:` type($result)"

    def __init__(self, name: str, axes: Sequence[str], result_type: TensorType, fill: int | None = None):
        super().__init__(
            result_types=[result_type],
            properties={
                "name": StringAttr(name), "axes": ArrayAttr([StringAttr(a) for a in axes]),
                "fill": None if fill is None else IntegerAttr(fill, 64),
            },
        )

    @property
    def cname(self) -> str:
        return self.cache_name.data

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.data for a in self.axes.data)

    @property
    def fill_value(self) -> int:
        return 0 if self.fill is None else self.fill.value.data

    def verify_(self) -> None:
        shape, axes = shape_of(self.result), self.axis_names
        self.expect(len(axes) == len(shape), f"'{self.cname}': {len(axes)} axis names for a rank-{len(shape)} cache")
        self.expect(BATCH_AXIS in axes and SEQ_AXIS in axes, f"'{self.cname}': needs '{BATCH_AXIS}' and '{SEQ_AXIS}'")
        self.expect(axes.index(SEQ_AXIS) == axes.index(BATCH_AXIS) + 1, f"'{SEQ_AXIS}' must follow '{BATCH_AXIS}'")
        for axis, dim in zip(axes, shape, strict=True):
            dynamic = axis in (BATCH_AXIS, SEQ_AXIS)
            self.expect((dim == DYN) == dynamic, f"'{self.cname}': only batch and cache_seq are dynamic ({axis})")


@irdl_op_definition
class CacheUpdateOp(_Op):
    """Writes `new` [B, S, ...] into `cache` [B, T, ...] at sequence index `slot` (a scalar), returning the updated
    cache: one step's entries go into the slots the runtime reserved for it."""

    name = "dsv3.cache_update"
    cache = operand_def(TensorType)
    new = operand_def(TensorType)
    slot = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, cache: SSAValue, new: SSAValue, slot: SSAValue):
        super().__init__(operands=[cache, new, slot], result_types=[cache.type])

    def verify_(self) -> None:
        cs, ns = shape_of(self.cache), shape_of(self.new)
        self.expect(len(cs) == len(ns) >= 2, f"cache {_fmt(cs)} and entries {_fmt(ns)} must have the same rank")
        self.expect(_same_shape(cs[2:], ns[2:]), f"entries {_fmt(ns)} do not fit the cache {_fmt(cs)}")
        slot = self.slot.type
        assert isinstance(slot, TensorType)
        self.expect(shape_of(slot) == () and isinstance(slot.element_type, IntegerType), "slot must be a scalar int")
        self.expect(self.result.type == self.cache.type, "result type must equal the cache type")


@irdl_op_definition
class CacheStoreOp(_Op):
    """The named cache's value for the next call (what `dsv3.cache` of that name reads then)."""

    name = "dsv3.cache_store"
    value = operand_def(TensorType)
    cache_name = prop_def(StringAttr, prop_name="name")
    assembly_format = "operands attr-dict `:` type(operands)"

    def __init__(self, value: SSAValue, name: str):
        super().__init__(operands=[value], properties={"name": StringAttr(name)})


CACHE_OPS: list[type[IRDLOperation]] = [CacheOp, CacheUpdateOp, CacheStoreOp]
"""Listed in `dialects/dialect.py`."""


def cache_decls(root: IRDLOperation) -> list[CacheOp]:
    """Every cache declared under `root`, in program order."""
    return [op for op in root.walk() if isinstance(op, CacheOp)]
