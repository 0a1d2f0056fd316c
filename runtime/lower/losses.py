"""Lowering of the language-model loss: the cross-entropy of given logits, and the head and its loss fused."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from ..kernels.packed_matmul import packed_matmul, weight_grad
from .registry import LoweringContext, register_lowering
from .tensor import explicit_spec


def _token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(negative log-likelihood of each token's label, the log-sum-exp and the one-hot labels it used) for float32
    logits. The label's logit is a one-hot contraction, not a gather: it stays a local product plus one reduction
    when the vocabulary is sharded over the tensor axis."""
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.sum(logits * one_hot, axis=-1), lse, one_hot


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of `labels` over the tokens where `mask` is 1."""
    nll, _, _ = _token_nll(logits.astype(jnp.float32), labels)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register_lowering(dsv3.CrossEntropyOp)
def _cross_entropy(op, args, ctx):
    return [cross_entropy(*args)]


def _slices(chunks: int, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Each [B, S, ...] as [chunks, B, S / chunks, ...]: the scan's sequence slices."""
    return tuple(jnp.moveaxis(x.reshape(x.shape[0], chunks, -1, *x.shape[2:]), 1, 0) for x in xs)


def _unslice(x: jax.Array) -> jax.Array:
    """[chunks, B, S / chunks, ...] -> [B, S, ...]."""
    chunks, batch, part = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(batch, chunks * part, *x.shape[3:])


def _divisor(chunks: int, seq: int) -> int:
    """The largest number of slices, at most `chunks`, that divides the sequence."""
    return max(c for c in range(1, min(chunks, seq) + 1) if seq % c == 0)


def head_loss(h: jax.Array, head: jax.Array, labels: jax.Array, mask: jax.Array, chunks: int,
              packed: bool = False) -> jax.Array:
    """`cross_entropy(h @ head, labels, mask)` over `chunks` slices of the sequence, each a checkpointed step of a
    scan: the forward pass keeps no logits, the backward pass recomputes one slice's logits at a time. `packed`:
    the head's gradient from a packed h^T (the `packed` kernel, `runtime/kernels/packed_matmul.py`)."""
    chunks = _divisor(chunks, h.shape[1])

    @jax.checkpoint
    def slice_nll(h_i: jax.Array, labels_i: jax.Array, mask_i: jax.Array) -> jax.Array:
        weights = head.astype(h_i.dtype)
        if packed:
            logits = packed_matmul(h_i, weights, jnp.float32)
        else:
            logits = jnp.matmul(h_i, weights, preferred_element_type=jnp.float32)
        return jnp.sum(_token_nll(logits, labels_i)[0] * mask_i)

    def step(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + slice_nll(*xs), None

    total, _ = lax.scan(step, jnp.zeros((), jnp.float32), _slices(chunks, h, labels, mask))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss_forward_grads(h: jax.Array, head: jax.Array, labels: jax.Array, mask: jax.Array, chunks: int,
                            packed: bool = False):
    """`head_loss` whose gradients are computed in the forward pass, over `chunks` slices of the sequence: each
    slice's logits give its loss and, at once, the gradient of the mean loss w.r.t. them ((softmax - one-hot) *
    mask / tokens), hence the slice's gradient of h and its share of the head's. The loss is a scalar, so the
    backward pass only scales the two by its cotangent: no logits are kept or recomputed, and XLA never writes the
    logits' gradient transposed for the weight gradient (on XLA:CPU that copy cost more than a third of the head's
    backward GEMMs). `packed`: the head's gradient from a packed h^T, as the `packed` kernel computes it."""
    return _loss_and_grads(h, head, labels, mask, chunks, packed)[0]


FORWARD_SLICE_BYTES = 8 * 2**20
"""The least float32 logits a slice of `head_loss_forward_grads` holds: smaller slices cost more in loop steps than
they gain in cache (on XLA:CPU, `tiny`'s 1 MiB of logits in 4 slices took 7% longer a train step than in one; the
peer model's 32 MiB in 4 were 3% faster than in one, `benchmarks/RESULTS.md`)."""


def _loss_and_grads(h, head, labels, mask, chunks, packed):
    """(loss, (d loss / d h, d loss / d head)): GEMMs in h's dtype with float32 accumulation, as `head_loss`. At
    most `chunks` slices, fewer where they would hold less than `FORWARD_SLICE_BYTES` of logits each."""
    batch, seq, _ = h.shape
    wanted = -(-batch * seq * head.shape[1] * 4 // FORWARD_SLICE_BYTES)
    chunks = _divisor(min(chunks, wanted), seq)
    weights = head.astype(h.dtype)
    tokens = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

    def step(d_head: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        h_i, labels_i, mask_i = xs
        logits = jnp.matmul(h_i, weights, preferred_element_type=jnp.float32)
        nll, lse, one_hot = _token_nll(logits, labels_i)
        scale = mask_i.astype(jnp.float32) / tokens
        d_logits = ((jnp.exp(logits - lse[..., None]) - one_hot) * scale[..., None]).astype(h.dtype)
        d_h = jnp.matmul(d_logits, weights.T, preferred_element_type=jnp.float32)
        if packed:
            d_head += weight_grad(h_i, d_logits, jnp.float32)
        else:
            d_head += jnp.einsum("bsd,bsv->dv", h_i, d_logits, preferred_element_type=jnp.float32)
        return d_head, (jnp.sum(nll * mask_i), d_h)

    d_head, (nll, d_h) = lax.scan(step, jnp.zeros(head.shape, jnp.float32), _slices(chunks, h, labels, mask))
    return jnp.sum(nll) / tokens, (_unslice(d_h), d_head)


def _forward_grads_fwd(h, head, labels, mask, chunks, packed):
    loss, (d_h, d_head) = _loss_and_grads(h, head, labels, mask, chunks, packed)
    return loss, (d_h.astype(h.dtype), d_head.astype(head.dtype))


def _forward_grads_bwd(chunks, packed, grads, cotangent):
    d_h, d_head = grads
    return (cotangent * d_h).astype(d_h.dtype), (cotangent * d_head).astype(d_head.dtype), None, None


head_loss_forward_grads.defvjp(_forward_grads_fwd, _forward_grads_bwd)


@register_lowering(dsv3.HeadLossOp)
def _head_loss(op: dsv3.HeadLossOp, args, ctx: LoweringContext):
    h, head, labels, mask = args
    if ctx.explicit and ctx.mesh is not None:  # explicit axes must type every slice's product: one product instead
        logits = jnp.matmul(h, head.astype(h.dtype), preferred_element_type=jnp.float32,
                            out_sharding=PartitionSpec(*explicit_spec(h)[:-1], explicit_spec(head)[-1]))
        return [cross_entropy(logits, labels, mask)]
    packed = op.kernel_choice() == Kernel.PACKED
    if op.grads_when == dsv3.HeadLossGrads.FORWARD:
        return [head_loss_forward_grads(h, head, labels, mask, op.int_prop("chunks"), packed)]
    return [head_loss(h, head, labels, mask, op.int_prop("chunks"), packed)]
