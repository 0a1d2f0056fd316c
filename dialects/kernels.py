"""Kernel choice as an IR attribute: which implementation an attention core or a grouped expert GEMM lowers to.

The choice is a compiler decision like a sharding or a quantisation, so it lives in the IR where a reader of the dump
sees it and a hand edit changes it: `dsv3-kernels` writes `kernel = #dsv3<kernel splash>` on the ops it chooses for,
each target's default pipeline runs that pass with the target's own choices, and the lowering looks the kernel up in
its table (`runtime/lower/registry.py`). An op without the attribute lowers to its plain XLA form.
"""

from __future__ import annotations

from enum import auto

from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import SpacedOpaqueSyntaxAttribute
from xdsl.irdl import irdl_attr_definition
from xdsl.utils.str_enum import StrEnum


class Kernel(StrEnum):
    """Every kernel some target can lower an op to. Which ops accept which is each op's `KERNELS`."""

    XLA = auto()
    """The plain XLA form: for attention, f32 scores [B, H, S, T] in memory, fused by XLA as it can; for a matmul,
    `jnp.matmul` differentiated by JAX."""
    BLOCKWISE = auto()
    """Attention in blocks with an online softmax, in plain JAX (any platform): never holds S x T scores."""
    SPLASH = auto()
    """Attention as the Pallas TPU splash kernel (forward and backward)."""
    CUDNN = auto()
    """Attention as cuDNN's fused flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention`)."""
    RAGGED_DOT = auto()
    """Grouped expert GEMMs as `lax.ragged_dot` (native on TPU and GPU; dense over all experts on XLA:CPU)."""
    TILED = auto()
    """Grouped expert GEMMs over row tiles that each belong to one expert: routed-size work on any platform."""
    MEGABLOX = auto()
    """Grouped expert GEMMs as the Pallas TPU megablox kernel (`gmm`, with `tgmm` for the weight gradient)."""
    PACKED = auto()
    """A matmul (or the output head's) whose weight gradient reads the activations from a transposed row-major copy
    instead of through a transposed GEMM operand, which XLA:CPU's GEMM runs 1.2-2.3x slower."""


ATTENTION_KERNELS = (Kernel.XLA, Kernel.BLOCKWISE, Kernel.SPLASH, Kernel.CUDNN)
EXPERT_KERNELS = (Kernel.RAGGED_DOT, Kernel.TILED, Kernel.MEGABLOX)
MATMUL_KERNELS = (Kernel.XLA, Kernel.PACKED)


@irdl_attr_definition
class KernelAttr(EnumAttribute[Kernel], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<kernel blockwise>`."""

    name = "dsv3.kernel"


KERNEL_ATTRS = [KernelAttr]
