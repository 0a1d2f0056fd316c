"""Lowering of recompute tags: `dsv3.checkpoint` names a value for JAX, and a layer's tags become its
`jax.checkpoint` policy (applied by the `dsv3.layer_stack` rule in `structure.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from xdsl.ir import Block

from ...dialects.remat import CheckpointOp, RematAction
from ..kernels import blockwise_attention
from . import experts
from .registry import register_lowering

Policy = Callable[..., Any]


@register_lowering(CheckpointOp)
def _checkpoint(op: CheckpointOp, args, ctx):
    x = args[0]
    if jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
        # FP8 values (dsv3-fp8-quant) are saved as their bits: JAX guards a saved residual with
        # reduce_precision(finfo(dtype)), which XLA applies with IEEE semantics, turning E4M3FN's top binade
        # (256..448, where every tile's amax lands) into inf.
        bits = checkpoint_name(lax.bitcast_convert_type(x, jnp.uint8), op.tag)
        return [lax.bitcast_convert_type(bits, x.dtype)]
    return [checkpoint_name(x, op.tag)]


def layer_tags(block: Block) -> dict[RematAction, list[str]]:
    """The names a layer's tags give each action: {save: [...], offload: [...], recompute: [...]}."""
    tags: dict[RematAction, list[str]] = {action: [] for action in RematAction}
    for op in block.ops:
        if isinstance(op, CheckpointOp):
            tags[op.action.data].append(op.tag)
    return tags


KERNEL_RESIDUALS = {"attention": blockwise_attention.RESIDUALS, "experts": experts.RESIDUALS}
"""What each kernel family names for its own backward: saved with the tagged values for the kernels a stack's
`kernel_residuals` lists."""


def remat_policy(block: Block, kernels: Sequence[str] = ()) -> Policy:
    """The `jax.checkpoint` policy of one layer: only the values tagged `save` (and `offload`, to pinned host
    memory), and the residuals of the `kernels` named, are residuals of the backward pass. An allow-list rather than
    "everything except the recomputed names", because JAX would otherwise keep the untagged value just before each
    recomputed one (the matmul output under its name), and nothing would be saved."""
    tags = layer_tags(block)
    saved = [*tags[RematAction.SAVE], *(name for kernel in kernels for name in KERNEL_RESIDUALS[kernel])]
    if tags[RematAction.OFFLOAD]:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=saved,
            names_which_can_be_offloaded=tags[RematAction.OFFLOAD],
            offload_src="device",
            offload_dst="pinned_host",
        )
    return jax.checkpoint_policies.save_only_these_names(*saved)
