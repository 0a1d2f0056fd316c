"""Lowering of the language-model loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...dialects import dsv3
from .registry import register_lowering


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of `labels` over the tokens where `mask` is 1."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register_lowering(dsv3.CrossEntropyOp)
def _cross_entropy(op, args, ctx):
    return [cross_entropy(*args)]
