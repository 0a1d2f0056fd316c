"""Lowering of DeepSeekMoE: group-limited routing, dropless grouped experts, balance loss and expert load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from ...dialects.sharding import BATCH_AXES
from .experts import routed_experts, routed_experts_sharded
from .fp8 import fp8_expert_gemm
from .registry import LoweringContext, kernel_impl, register_lowering
from .tensor import explicit_spec
from .weights import cast_weight


def route(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array,
    *,
    score: dsv3.RouterScore,
    top_k: int,
    groups: int,
    keep_groups: int,
    scale: float,
    normalize: bool,
    logits_sharding: PartitionSpec | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (gate weights [..., k] f32, expert indices [..., k] i32, scores [..., E] f32).

    The gate runs in float32 (V3 keeps it out of low precision). The bias only steers selection; the weights come
    from the unbiased scores. `logits_sharding` states the gate's output layout under explicit-axis sharding."""
    logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), out_sharding=logits_sharding)
    scores = jax.nn.sigmoid(logits) if score == dsv3.RouterScore.SIGMOID else jax.nn.softmax(logits, axis=-1)
    experts = scores.shape[-1]
    biased = scores + bias.astype(jnp.float32)
    if groups > 1:
        grouped = biased.reshape(*biased.shape[:-1], groups, experts // groups)
        best = lax.top_k(grouped, min(2, experts // groups))[0]
        group_scores = jnp.sum(best, axis=-1) if score == dsv3.RouterScore.SIGMOID else best[..., 0]
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
def _router(op: dsv3.RouterOp, args, ctx: LoweringContext):
    explicit = ctx.explicit and ctx.mesh is not None
    return route(
        *args, score=op.score.data, top_k=op.int_prop("top_k"), groups=op.int_prop("groups"),
        keep_groups=op.int_prop("keep_groups"), scale=op.float_prop("scale"), normalize=op.bool_prop("normalize"),
        logits_sharding=PartitionSpec(*explicit_spec(args[0])[:-1], None) if explicit else None,
    )


@register_lowering(dsv3.ExpertsOp)
def _experts(op: dsv3.ExpertsOp, args, ctx: LoweringContext):
    gemm = fp8_expert_gemm(op, ctx) if op.quantized else kernel_impl(op, Kernel.RAGGED_DOT)
    if ctx.grads_in_compute_dtype:
        # cast before dispatch, so that the weights' gradients leave it in the compute dtype (on a mesh their sum
        # over devices then runs in that dtype, as the dense layers' does); otherwise each GEMM casts its own. The
        # FP8 GEMMs quantise what they are given, the compute-dtype weights either way
        dtype = args[0].dtype
        args = [*args[:3], *(cast_weight(op.operands[i], args[i], dtype, ctx) for i in range(3, 6))]
    mesh = ctx.mesh
    if mesh is not None:
        batch_axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
        chunks = op.int_prop("chunks") if op.chunks is not None else 1
        capacity_factor = op.opt_float_prop("capacity_factor")
        return [
            routed_experts_sharded(
                *args, mesh, batch_axes, capacity_factor, ctx.explicit, gemm=gemm, chunks=chunks
            )
        ]
    return [routed_experts(*args, gemm=gemm)]


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
    # a one-hot sum rather than bincount: a reduction over the (possibly sharded) token axes is one all-reduce
    chosen = jax.nn.one_hot(args[0], experts, dtype=jnp.float32)
    return [jnp.sum(chosen, axis=tuple(range(chosen.ndim - 1)))]
