"""Lowering of the language-model loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...dialects import dsv3
from .registry import register_lowering


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of `labels` over the tokens where `mask` is 1."""
    logits = logits.astype(jnp.float32)
    # the label's logit as a one-hot contraction, not a gather: it stays a local product plus one reduction when
    # the vocabulary is sharded over the tensor axis
    label_logit = jnp.sum(logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register_lowering(dsv3.CrossEntropyOp)
def _cross_entropy(op, args, ctx):
    return [cross_entropy(*args)]
