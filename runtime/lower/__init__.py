"""Lowering rules from dsv3 ops to JAX, one module per concern; importing this package registers them all."""

from . import attention, cache, fp8, kernels, latent, losses, moe, norm, remat, rope, sharding, structure, tensor  # noqa: F401
from .registry import LOWERINGS, LoweringContext, LoweringError, lower_block, register_lowering

__all__ = ["LOWERINGS", "LoweringContext", "LoweringError", "lower_block", "register_lowering"]
