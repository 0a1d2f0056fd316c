"""Routed experts as grouped GEMMs, on one device or across a mesh.

On one device, the (token, choice) rows are sorted by expert and run as grouped GEMMs (`lax.ragged_dot`): dropless,
no FLOPs spent on experts a token did not choose (on TPU and GPU; XLA:CPU lowers ragged_dot densely).

On a mesh, each device routes its own tokens. With an `expert` axis (expert parallelism) each device holds E/ep
experts; dispatch sends every token at most once to each device that hosts one of its chosen experts (with
group-limited routing aligned to the expert axis, that is at most `keep_groups` devices: DeepSeek-V3's node-limited
routing), with the local ids and gate weights of the experts it chose there. The receiving device runs its experts
over the (row, choice) pairs that are its own and sums each row's results with the gate weights; a second
all-to-all brings the partial sums home. Buffers have a static capacity per (source, destination) pair: every local
token when dropless, or `ceil(capacity_factor * T * min(k, ep) / ep)` rows, beyond which a token's contribution from
that destination is dropped, as in GShard/Switch."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec

from ...dialects import dsv3
from ...dialects.kernels import Kernel
from .registry import register_kernel
from .tensor import swiglu

GroupedGemm = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""(rows sorted by group [T, K], weights [G, K, N], group sizes [G]) -> [T, N]: a grouped-GEMM kernel
(`lax.ragged_dot` and the others registered for `dsv3.experts`) or an FP8 one. Rows past the sum of the group sizes
belong to no group; their results are never read."""

register_kernel(dsv3.ExpertsOp, Kernel.RAGGED_DOT)(lax.ragged_dot)


def routed_experts(x, weights, indices, w_gate, w_up, w_down, gemm: GroupedGemm = lax.ragged_dot) -> jax.Array:
    """Dropless SwiGLU experts: the (token, choice) rows are sorted by expert and run as grouped GEMMs
    (`lax.ragged_dot`), then put back in token order and summed with the gate weights in float32."""
    shape = x.shape
    experts, dim = w_gate.shape[0], shape[-1]
    top_k = indices.shape[-1]
    flat_experts = indices.reshape(-1)
    order, inverse = _sort(flat_experts)
    rows = _named(sorted_rows(x.reshape(-1, dim), order, inverse), "rows")
    group_sizes = _named(jnp.bincount(flat_experts, length=experts).astype(jnp.int32), "sizes")
    out = _sorted_swiglu(rows, group_sizes, w_gate, w_up, w_down, gemm)
    unsorted = _named(permute_rows(out, inverse, order).reshape(-1, top_k, dim), "unsorted")
    combined = jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), weights.reshape(-1, top_k))
    return combined.astype(x.dtype).reshape(shape)


RESIDUALS = tuple(f"experts.{name}" for name in ("order", "inverse", "rows", "sizes", "gate", "up", "hidden",
                                                  "unsorted"))
"""Names of what the routed experts' backward reads (the sort and its inverse, the sorted rows, the group sizes,
both GEMMs' outputs, their SwiGLU, the unsorted results), for a recompute policy to save
(`dsv3-remat{kernels=experts}`) rather than run the experts' forward again."""


def _named(value: jax.Array, name: str) -> jax.Array:
    return checkpoint_name(value, f"experts.{name}")


def _sort(flat_experts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, inverse): the (token, choice) pairs by expert, stably, and each pair's place in that order."""
    order = jnp.argsort(flat_experts, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    return _named(order, "order"), _named(inverse, "inverse")


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[perm] for a permutation `perm` whose inverse is `inverse`, differentiated as the gather g[inverse].

    JAX's derivative of a gather, and the forward of `zeros.at[perm].set(x)`, is a scatter, which XLA:CPU runs
    5-20x slower than a gather of the same rows ([4096, 512], f32 and bf16) and only in float32; on the 34M-parameter
    peer model the experts' scatters took 44 ms of thread time per bf16 train step (XLA's profile). A permutation's
    transpose is the gather by its inverse."""
    return x[perm]


def _permute_rows_fwd(x, perm, inverse):
    return permute_rows(x, perm, inverse), inverse


def _permute_rows_bwd(inverse, g):
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@jax.custom_vjp
def sorted_rows(tokens: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """tokens[order // k] for `order` a permutation of the T x k (token, choice) pairs: each token once per choice,
    in the sorted order. Its derivative sums each token's k rows, gathered by `inverse`: no scatter-add."""
    return tokens[order // (order.shape[0] // tokens.shape[0])]


def _sorted_rows_fwd(tokens, order, inverse):
    return sorted_rows(tokens, order, inverse), (inverse, tokens.shape[0])


def _sorted_rows_bwd(residuals, g):
    inverse, num_tokens = residuals
    per_token = g[inverse].reshape(num_tokens, -1, g.shape[-1])
    return per_token.sum(1, dtype=jnp.float32).astype(g.dtype), None, None


sorted_rows.defvjp(_sorted_rows_fwd, _sorted_rows_bwd)


def _sorted_swiglu(rows, group_sizes, w_gate, w_up, w_down, gemm: GroupedGemm) -> jax.Array:
    """SwiGLU experts over rows sorted by group, as three grouped GEMMs, with the values backward reads named."""
    dtype = rows.dtype
    gate = _named(gemm(rows, w_gate.astype(dtype), group_sizes), "gate")
    up = _named(gemm(rows, w_up.astype(dtype), group_sizes), "up")
    return gemm(_named(swiglu(gate, up), "hidden"), w_down.astype(dtype), group_sizes)


def capacity(tokens: int, top_k: int, ep: int, capacity_factor: float | None) -> int:
    """Rows each device may send to each other device."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * min(top_k, ep) / ep)))


def _local_experts(rows, pairs_expert, pairs_weight, w_gate, w_up, w_down, gemm: GroupedGemm) -> jax.Array:
    """rows [R, D]; pairs [R, k] of (local expert id, or E_local when not here; gate weight). Returns [R, D]:
    sum over a row's local choices of weight * expert(row), in float32."""
    experts = w_gate.shape[0]
    num_rows, top_k = pairs_expert.shape
    flat = pairs_expert.reshape(-1)
    # foreign pairs (id == experts) sort last, beyond the group sizes
    order, inverse = _sort(flat)
    gathered = _named(sorted_rows(rows, order, inverse), "rows")
    sizes = _named(jnp.bincount(flat, length=experts + 1)[:experts].astype(jnp.int32), "sizes")
    out = _sorted_swiglu(gathered, sizes, w_gate, w_up, w_down, gemm)
    unsorted = _named(permute_rows(out, inverse, order).reshape(num_rows, top_k, -1), "unsorted")
    return jnp.einsum("rkd,rk->rd", unsorted.astype(jnp.float32), pairs_weight)


def _dispatch_compute_combine(
    x, weights, indices, w_gate, w_up, w_down, *, ep: int, capacity_factor: float | None, gemm: GroupedGemm
):
    """Per-device body (inside shard_map): local tokens x [b, s, D], routing [b, s, k], local experts [E/ep, ...]."""
    shape = x.shape
    dim = shape[-1]
    tokens = x.reshape(-1, dim)
    num_tokens = tokens.shape[0]
    top_k = indices.shape[-1]
    local = w_gate.shape[0]
    idx = indices.reshape(num_tokens, top_k)
    gate_w = weights.reshape(num_tokens, top_k).astype(jnp.float32)
    cap = capacity(num_tokens, top_k, ep, capacity_factor)

    dest = idx // local  # [T, k] device holding each chosen expert
    devices = jnp.arange(ep)
    goes = jnp.any(dest[:, :, None] == devices, axis=1)  # [T, ep]: token t visits device d
    slot = jnp.cumsum(goes, axis=0) - 1  # [T, ep] row of token t in the buffer for d
    kept = goes & (slot < cap)
    row = jnp.where(kept, slot, cap)  # cap = out of range: dropped by the scatters below
    # What each destination needs per row: the local id of every choice it hosts (or `local` = not here), weights.
    here = dest[:, None, :] == devices[None, :, None]  # [T, ep, k]
    pair_expert = jnp.where(here, (idx % local)[:, None, :], local)
    pair_weight = jnp.where(here, gate_w[:, None, :], 0.0)

    def scatter(values, fill):
        buffer = jnp.full((ep, cap, *values.shape[2:]), fill, values.dtype)
        return buffer.at[devices[None, :], row].set(values, mode="drop")

    send_x = scatter(jnp.broadcast_to(tokens[:, None, :], (num_tokens, ep, dim)), 0)
    send_e = scatter(pair_expert, local)
    send_w = scatter(pair_weight, 0.0)

    def exchange(buffer):
        return lax.all_to_all(buffer, "expert", split_axis=0, concat_axis=0, tiled=True)

    recv_x, recv_e, recv_w = exchange(send_x), exchange(send_e), exchange(send_w)
    out = _local_experts(
        recv_x.reshape(ep * cap, dim), recv_e.reshape(ep * cap, top_k), recv_w.reshape(ep * cap, top_k),
        w_gate, w_up, w_down, gemm,
    )
    back = exchange(out.reshape(ep, cap, dim))  # [ep, cap, D]: partial sums for my tokens from each device
    gathered = back.at[devices[None, :], row].get(mode="fill", fill_value=0.0)  # [T, ep, D]
    return jnp.sum(gathered, axis=1).astype(x.dtype).reshape(shape)


def _in_chunks(x, weights, indices, w_gate, w_up, w_down, *, chunks: int, **options) -> jax.Array:
    """Independent dispatch/compute/combine pipelines over token chunks: no data flows between them, so the
    latency-hiding scheduler can run one chunk's all-to-all under another's expert GEMMs."""
    tokens = x.shape[0] * x.shape[1]
    if chunks <= 1 or tokens % chunks:
        return _dispatch_compute_combine(x, weights, indices, w_gate, w_up, w_down, **options)
    per_chunk = [a.reshape(chunks, 1, tokens // chunks, a.shape[-1]) for a in (x, weights, indices)]
    pieces = [
        _dispatch_compute_combine(*(a[c] for a in per_chunk), w_gate, w_up, w_down, **options)
        for c in range(chunks)
    ]
    return jnp.concatenate(pieces, axis=1).reshape(x.shape)


def routed_experts_sharded(
    x, weights, indices, w_gate, w_up, w_down, mesh: Mesh, batch_axes: tuple[str, ...],
    capacity_factor: float | None = None, explicit: bool = False, gemm: GroupedGemm = lax.ragged_dot,
    chunks: int = 1,
) -> jax.Array:
    """Routed experts on a mesh: each device routes its own tokens (sorting a sharded token axis would need them
    gathered). With an `expert` axis, experts are split over it and tokens travel by all-to-all; without one, each
    device runs all experts (their weights gathered, as FSDP gathers any weight) on its local tokens."""
    ep = mesh.shape.get("expert", 1)
    if w_gate.shape[0] % ep:
        raise ValueError(f"{w_gate.shape[0]} experts do not split over expert={ep} devices")
    batch = PartitionSpec(batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None), None, None)
    experts = PartitionSpec("expert" if ep > 1 else None, None, None)
    specs = (batch, batch, batch, experts, experts, experts)
    args = (x, weights, indices, w_gate, w_up, w_down)
    if explicit:  # explicit axes: shard_map's inputs must already have its layouts
        args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, specs, strict=True))

    def body(*local):
        if ep > 1:
            return _in_chunks(*local, chunks=chunks, ep=ep, capacity_factor=capacity_factor, gemm=gemm)
        return routed_experts(*local, gemm=gemm)

    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)(*args)
