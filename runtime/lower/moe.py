"""Lowering of DeepSeekMoE: group-limited routing, dropless grouped experts, balance loss and expert load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ...dialects import dsv3
from .registry import register_lowering
from .tensor import swiglu


def route(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array,
    *,
    score: str,
    top_k: int,
    groups: int,
    keep_groups: int,
    scale: float,
    normalize: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (gate weights [..., k] f32, expert indices [..., k] i32, scores [..., E] f32).

    The gate runs in float32 (V3 keeps it out of low precision). The bias only steers selection; the weights come
    from the unbiased scores."""
    logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    experts = scores.shape[-1]
    biased = scores + bias.astype(jnp.float32)
    if groups > 1:
        grouped = biased.reshape(*biased.shape[:-1], groups, experts // groups)
        best = lax.top_k(grouped, min(2, experts // groups))[0]
        group_scores = jnp.sum(best, axis=-1) if score == "sigmoid" else best[..., 0]
        kept = lax.top_k(group_scores, keep_groups)[1]
        group_mask = jnp.sum(jax.nn.one_hot(kept, groups, dtype=jnp.bool_), axis=-2) > 0
        expert_mask = jnp.repeat(group_mask, experts // groups, axis=-1)
        biased = jnp.where(expert_mask, biased, -jnp.inf)
    indices = lax.top_k(biased, top_k)[1]
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scale, indices.astype(jnp.int32), scores


@register_lowering(dsv3.RouterOp)
def _router(op: dsv3.RouterOp, args, ctx):
    return route(
        *args, score=op.score.data, top_k=op.int_prop("top_k"), groups=op.int_prop("groups"),
        keep_groups=op.int_prop("keep_groups"), scale=op.float_prop("scale"), normalize=op.bool_prop("normalize"),
    )


def routed_experts(x, weights, indices, w_gate, w_up, w_down) -> jax.Array:
    """Dropless SwiGLU experts: the (token, choice) rows are sorted by expert and run as grouped GEMMs
    (`lax.ragged_dot`), then scattered back and summed with the gate weights in float32."""
    shape = x.shape
    experts, dim = w_gate.shape[0], shape[-1]
    top_k = indices.shape[-1]
    tokens = x.reshape(-1, dim)
    flat_experts = indices.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    rows = tokens[order // top_k]
    group_sizes = jnp.bincount(flat_experts, length=experts).astype(jnp.int32)
    dtype = x.dtype
    gate = lax.ragged_dot(rows, w_gate.astype(dtype), group_sizes)
    up = lax.ragged_dot(rows, w_up.astype(dtype), group_sizes)
    out = lax.ragged_dot(swiglu(gate, up), w_down.astype(dtype), group_sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(-1, top_k, dim)
    combined = jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), weights.reshape(-1, top_k))
    return combined.astype(dtype).reshape(shape)


@register_lowering(dsv3.ExpertsOp)
def _experts(op, args, ctx):
    return [routed_experts(*args)]


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, alpha: float) -> jax.Array:
    """alpha * sum_i f_i P_i per sequence, averaged over the batch (REFERENCE.md section 3):
    f_i = E/(k*S) * #tokens choosing expert i, P_i = mean over tokens of the normalised score of expert i."""
    experts, top_k, length = scores.shape[-1], indices.shape[-1], scores.shape[1]
    chosen = jnp.sum(jax.nn.one_hot(indices, experts, dtype=jnp.float32), axis=-2)  # [B, S, E]
    f = jnp.sum(chosen, axis=1) * experts / (top_k * length)
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)
    return alpha * jnp.mean(jnp.sum(f * p, axis=-1))


@register_lowering(dsv3.BalanceLossOp)
def _balance_loss(op: dsv3.BalanceLossOp, args, ctx):
    return [sequence_balance_loss(*args, op.float_prop("alpha"))]


@register_lowering(dsv3.ExpertLoadOp)
def _expert_load(op: dsv3.ExpertLoadOp, args, ctx):
    experts = op.int_prop("experts")
    return [jnp.bincount(args[0].reshape(-1), length=experts).astype(jnp.float32)]
