"""The TPU Pallas kernels (splash attention, megablox grouped GEMMs) against the plain forms they replace.

Values and gradients run in Pallas's interpreter on the CPU, on the smallest shapes the kernels take (the
interpreter is slow); one ahead-of-time compile for a tpu-v5p-8 topology checks that the real kernels lower, forward
and backward, to TPU custom calls."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3c.runtime.kernels.megablox import megablox_gmm
from dsv3c.runtime.kernels.splash import sharded_splash_attention
from dsv3c.runtime.lower.attention import mla_attention
from dsv3c.runtime.xla import compile_lowered
from dsv3c.targets import resolve_target

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")

NOPE, ROPE, VALUE = 128, 64, 128


def attention_inputs(batch: int, seq: int, heads: int, dtype=jnp.float32) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(0), 6)
    shapes = [(batch, seq, heads, NOPE), (batch, seq, heads, ROPE), (batch, seq, heads, NOPE), (batch, seq, ROPE),
              (batch, seq, heads, VALUE), (batch, seq, heads, VALUE)]
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes, strict=True)]


def value_and_grads(attention, *args):
    """Sum of the output against a fixed cotangent (the last arg), and the gradients of the five inputs."""

    def loss(q_nope, q_pe, k_nope, k_pe, v, cotangent):
        return jnp.sum(attention(q_nope, q_pe, k_nope, k_pe, v) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)


def assert_close(got, want, tol: float = 1e-4) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def test_sharded_splash_matches_plain_attention_with_padding_and_several_blocks():
    # Batch over `data`, heads over `tensor`, replicated over `fsdp`: the shared rope key's gradient sums over head
    # shards, and nothing is counted twice over the axis the attention does not use. Per device, S = 320 pads to
    # 384 = three 128-blocks per side: masked, diagonal and full blocks, and padded keys.
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    args = attention_inputs(batch=2, seq=320, heads=2)
    scale = (NOPE + ROPE) ** -0.5
    got = value_and_grads(
        lambda *x: sharded_splash_attention(*x, scale, mesh, ("data",), "tensor", interpret=True), *args
    )
    assert_close(got, value_and_grads(lambda *x: mla_attention(*x, scale), *args))


def test_megablox_matches_ragged_dot_with_empty_groups_and_unrouted_rows():
    # K, N not multiples of 128 (padded), an empty group, and 50 rows past sum(group_sizes) (output and gradient 0).
    keys = jax.random.split(jax.random.key(1), 3)
    rows = jax.random.normal(keys[0], (200, 96))
    weights = jax.random.normal(keys[1], (4, 96, 160))
    cotangent = jax.random.normal(keys[2], (200, 160))
    sizes = jnp.array([30, 0, 70, 50], jnp.int32)

    def run(gemm):
        def loss(r, w):
            out = gemm(r, w, sizes)
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(rows, weights)
        return out, grads

    got = run(lambda *x: megablox_gmm(*x, interpret=True))
    assert_close(got, run(lax.ragged_dot))
    out, (d_rows, _) = got
    assert not np.any(np.asarray(out[150:])) and not np.any(np.asarray(d_rows[150:]))


@needs_libtpu
def test_kernels_compile_to_tpu_custom_calls_forward_and_backward():
    # One compile each of a value and its gradients: the forward kernel and the backward kernels (splash: dq and
    # dkv; megablox: gmm against transposed weights for d(rows), tgmm for d(weights)) must all be TPU custom calls.
    devices = resolve_target("tpu-v5p-8").devices(4)
    mesh = Mesh(np.array(devices), ("fsdp",))
    batch, per_head, replicated = PartitionSpec("fsdp"), PartitionSpec("fsdp", None, None, None), PartitionSpec()

    def spec(shape, dtype, partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))

    def kernels(loss, argnums, *operands) -> list[str]:
        """Names of the TPU custom calls in the optimized HLO of loss's value and gradients."""
        lowered = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*operands)
        text = compile_lowered(lowered, {}, "tpu")[1]
        return sorted(re.findall(r"%(\w+?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"", text))

    def attention_loss(*x):
        return jnp.sum(sharded_splash_attention(*x, 0.1, mesh, ("fsdp",), None).astype(jnp.float32))

    bf16, (b, s, h) = jnp.bfloat16, (4, 256, 2)
    attention_operands = [spec((b, s, h, NOPE), bf16, per_head), spec((b, s, h, ROPE), bf16, per_head),
                          spec((b, s, h, NOPE), bf16, per_head), spec((b, s, ROPE), bf16, batch),
                          spec((b, s, h, VALUE), bf16, per_head)]
    assert kernels(attention_loss, range(5), *attention_operands) == [
        "splash_mha_dkv_no_residuals", "splash_mha_dq_no_residuals", "splash_mha_fwd_residuals"
    ]

    def experts_loss(rows, weights, sizes):
        experts = jax.shard_map(megablox_gmm, mesh=mesh, in_specs=(batch, replicated, replicated), out_specs=batch,
                                check_vma=False)
        return jnp.sum(experts(rows, weights, sizes).astype(jnp.float32))

    gemm_operands = [spec((2048, 256), bf16, batch), spec((4, 256, 384), bf16, replicated),
                     spec((4,), jnp.int32, replicated)]
    assert kernels(experts_loss, (0, 1), *gemm_operands) == ["gmm", "gmm", "tgmm"]
