"""`dsv3-kernels`: choose the implementation of each compute-heavy op for the target.

Writes `kernel = #dsv3<kernel NAME>` on every `dsv3.attention` (`attention=`), `dsv3.experts` (`experts=`) and
`dsv3.matmul` and `dsv3.head_loss` (`matmul=`: how a weight gradient is computed, `packed` on the CPU), and
the module attribute `dsv3.fp8_backend` (`fp8=`: `exact` emulation, `emulate` on BF16 units, `native` FP8 GEMMs,
`pallas` the block-scaled FP8 kernels for fine-grained tiles and native FP8 GEMMs for the rest)
that says how the FP8 GEMMs run. Each target's default pipeline ends with this pass and its own choices
(`dsv3c/targets.py`), so the dump shows what every op will lower to, and a hand edit of the dump changes it.

An empty option leaves that choice alone. With `keep=true` (what the targets use), an op that already names a
kernel keeps it: a hand-edited IR wins over the target's defaults; the target then checks it can lower it.
`fp8=unavailable` states that the target has no way to run FP8 GEMMs: the pass refuses a module that holds any.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.passes import ModulePass
from xdsl.utils.exceptions import PassFailedException

from ..dialects import dsv3
from ..dialects.kernels import Kernel, KernelAttr
from ..dialects.quant import FP8MatmulOp
from ..runtime.lower.registry import FP8_BACKEND_ATTR

FP8_BACKENDS = ("exact", "emulate", "native", "pallas")


def holds_fp8(module: ModuleOp) -> bool:
    """Whether any GEMM of the module runs in FP8."""
    return any(isinstance(op, FP8MatmulOp) or (isinstance(op, dsv3.ExpertsOp) and op.quantized) for op in module.walk())


@dataclass(frozen=True)
class KernelsPass(ModulePass):
    name = "dsv3-kernels"

    attention: str = ""
    experts: str = ""
    matmul: str = ""
    fp8: str = ""
    keep: bool = False

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        matmul = self._kernel("matmul")
        choices = {dsv3.AttentionOp: self._kernel("attention"), dsv3.ExpertsOp: self._kernel("experts"),
                   dsv3.MatmulOp: matmul, dsv3.HeadLossOp: matmul}
        for inner in op.walk():
            kernel = choices.get(type(inner))
            if kernel is None or (self.keep and inner.kernel_choice() is not None):
                continue
            if kernel not in inner.KERNELS:
                allowed = ", ".join(k.value for k in inner.KERNELS)
                raise PassFailedException(f"dsv3-kernels: '{inner.name}' has no kernel '{kernel.value}' ({allowed})")
            inner.properties["kernel"] = KernelAttr(kernel)
        self._choose_fp8(op)

    def _kernel(self, option: str) -> Kernel | None:
        name = getattr(self, option)
        if not name:
            return None
        try:
            return Kernel(name)
        except ValueError:
            known = ", ".join(k.value for k in Kernel)
            raise PassFailedException(f"dsv3-kernels: unknown {option} kernel '{name}' ({known})") from None

    def _choose_fp8(self, module: ModuleOp) -> None:
        if not self.fp8 or (self.keep and FP8_BACKEND_ATTR in module.attributes):
            return
        if self.fp8 == "unavailable":
            if holds_fp8(module):
                raise PassFailedException(
                    "the IR holds FP8 GEMMs but the target has no FP8 hardware (int8 only): ask for emulation with "
                    "--fp8 emulate (fp8='emulate'), or compile without dsv3-fp8-quant"
                )
            return
        if self.fp8 not in FP8_BACKENDS:
            raise PassFailedException(f"dsv3-kernels: unknown fp8 backend '{self.fp8}' ({', '.join(FP8_BACKENDS)})")
        if holds_fp8(module):
            module.attributes[FP8_BACKEND_ATTR] = StringAttr(self.fp8)
