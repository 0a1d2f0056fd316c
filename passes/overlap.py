"""`dsv3-overlap`: communication/computation overlap for expert parallelism.

Two decisions, both written into the IR:
- each `dsv3.experts` gets `chunks = N`: its tokens are dispatched, computed and combined in N independent chunks, so
  the all-to-all of one chunk can run while another chunk's experts (or the shared expert and attention, which do not
  depend on the routed experts) compute, DeepSeek-V3's overlap of dispatch/combine with computation;
- a `dsv3.schedule` declaration holds the XLA options for the target platform that make collectives asynchronous and
  turn on the latency-hiding scheduler, which places independent compute between a collective's start and done.
The compile report then counts the asynchronous collectives and the compute scheduled inside each.

Options: `chunks` (default 2), `platform` (`tpu`, `gpu` or `cpu`; the driver passes the target's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter
from xdsl.utils.exceptions import PassFailedException

from ..dialects import dsv3
from ..dialects.schedule import ScheduleOp

PLATFORM_OPTIONS: dict[str, dict[str, bool]] = {
    "tpu": {"xla_tpu_enable_latency_hiding_scheduler": True, "xla_tpu_enable_async_all_to_all": True},
    "gpu": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "cpu": {},
}
"""XLA options per platform (XLA:CPU runs collectives synchronously: nothing to overlap there)."""


@dataclass(frozen=True)
class OverlapPass(ModulePass):
    name = "dsv3-overlap"

    chunks: int = 2
    platform: str = "tpu"

    PLATFORMS: ClassVar[tuple[str, ...]] = tuple(PLATFORM_OPTIONS)

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.platform not in PLATFORM_OPTIONS:
            raise PassFailedException(f"dsv3-overlap: unknown platform '{self.platform}' (tpu, gpu or cpu)")
        if self.chunks < 1:
            raise PassFailedException("dsv3-overlap: chunks must be at least 1")
        for experts in [o for o in op.walk() if isinstance(o, dsv3.ExpertsOp)]:
            experts.properties["chunks"] = IntegerAttr(self.chunks, 64)
        for old in [o for o in op.ops if isinstance(o, ScheduleOp)]:
            Rewriter.erase_op(old)
        schedule = ScheduleOp(self.platform, PLATFORM_OPTIONS[self.platform])
        Rewriter.insert_op(schedule, InsertPoint.at_start(op.body.block))
