"""Lowering of the cache ops: reading a named cache, writing one step's entries into it, storing it back."""

from __future__ import annotations

from jax import lax

from ...dialects.cache import CacheOp, CacheStoreOp, CacheUpdateOp
from .registry import LoweringContext, LoweringError, register_lowering


@register_lowering(CacheOp)
def _cache(op: CacheOp, args, ctx: LoweringContext):
    try:
        return [ctx.caches[op.cname]]
    except KeyError:
        raise LoweringError(f"cache '{op.cname}' was not provided") from None


@register_lowering(CacheUpdateOp)
def _cache_update(op: CacheUpdateOp, args, ctx: LoweringContext):
    """The S new entries go to sequence slots [slot, slot+S) (axis 1, after batch), in place under donation."""
    cache, new, slot = args
    return [lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), slot, axis=1)]


@register_lowering(CacheStoreOp)
def _cache_store(op: CacheStoreOp, args, ctx: LoweringContext):
    ctx.cache_stores[op.cache_name.data] = args[0]
    return []
