"""The scheduling decisions of the overlap pass: the XLA options that let collectives run asynchronously and the
latency-hiding scheduler place compute between their start and end."""

from __future__ import annotations

from collections.abc import Mapping

from xdsl.dialects.builtin import BoolAttr, DictionaryAttr, StringAttr
from xdsl.irdl import IRDLOperation, irdl_op_definition, prop_def

from .dsv3 import _Op


@irdl_op_definition
class ScheduleOp(_Op):
    """XLA compiler options for `platform` (cpu, gpu or tpu), applied when the program is compiled."""

    name = "dsv3.schedule"
    platform = prop_def(StringAttr)
    options = prop_def(DictionaryAttr)
    assembly_format = "attr-dict"

    def __init__(self, platform: str, options: Mapping[str, bool]):
        super().__init__(properties={
            "platform": StringAttr(platform),
            "options": DictionaryAttr({k: BoolAttr.from_bool(v) for k, v in options.items()}),
        })

    def verify_(self) -> None:
        self.expect(self.platform.data in ("cpu", "gpu", "tpu"), "platform must be cpu, gpu or tpu")


SCHEDULE_OPS: list[type[IRDLOperation]] = [ScheduleOp]
