"""Lowering of the language-model loss: the cross-entropy of given logits, and the head and its loss fused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from ...dialects import dsv3
from .registry import LoweringContext, register_lowering
from .tensor import explicit_spec


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


def head_loss(h: jax.Array, head: jax.Array, labels: jax.Array, mask: jax.Array, chunks: int) -> jax.Array:
    """`cross_entropy(h @ head, labels, mask)` over `chunks` slices of the sequence, each a checkpointed step of a
    scan: the forward pass keeps no logits, the backward pass recomputes one slice's logits at a time."""
    batch, seq, dim = h.shape
    chunks = max(c for c in range(1, min(chunks, seq) + 1) if seq % c == 0)

    def slices(x: jax.Array) -> jax.Array:  # [B, S, ...] -> [chunks, B, S / chunks, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, seq // chunks, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def slice_nll(h_i: jax.Array, labels_i: jax.Array, mask_i: jax.Array) -> jax.Array:
        logits = jnp.matmul(h_i, head.astype(h_i.dtype), preferred_element_type=jnp.float32)
        label_logit = jnp.sum(logits * jax.nn.one_hot(labels_i, logits.shape[-1], dtype=logits.dtype), axis=-1)
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - label_logit) * mask_i)

    def step(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + slice_nll(*xs), None

    total, _ = lax.scan(step, jnp.zeros((), jnp.float32), (slices(h), slices(labels), slices(mask)))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


@register_lowering(dsv3.HeadLossOp)
def _head_loss(op: dsv3.HeadLossOp, args, ctx: LoweringContext):
    h, head, labels, mask = args
    if ctx.explicit and ctx.mesh is not None:  # explicit axes must type every slice's product: one product instead
        logits = jnp.matmul(h, head.astype(h.dtype), preferred_element_type=jnp.float32,
                            out_sharding=PartitionSpec(*explicit_spec(h)[:-1], explicit_spec(head)[-1]))
        return [cross_entropy(logits, labels, mask)]
    return [head_loss(h, head, labels, mask, op.int_prop("chunks"))]
