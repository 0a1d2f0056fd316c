"""Kernel choice in the IR: the `#dsv3<kernel ...>` attribute, the `dsv3-kernels` pass, each target's choices and
checks, and the kernels that need no accelerator compared with the plain forms they replace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3c
from dsv3c.dialects.dsv3 import AttentionOp, ExpertsOp
from dsv3c.dialects.kernels import Kernel
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.frontend.errors import SpecError, UserError
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.kernels.cudnn_attention import cudnn_mla_attention
from dsv3c.runtime.lower.attention import mla_attention
from dsv3c.targets import resolve_target

TINY = "examples/tiny.dsv3"


def _module(pipeline: str = ""):
    module = dsv3c.build_ir(dsv3c.load(TINY))
    run_pipeline(module, pipeline)
    return module


def _kernels(module, op_type) -> list[Kernel | None]:
    return [op.kernel_choice() for op in module.walk() if isinstance(op, op_type)]


def test_pass_writes_the_choice_and_it_reads_back():
    module = _module("dsv3-kernels{attention=blockwise experts=tiled}")
    assert set(_kernels(module, AttentionOp)) == {Kernel.BLOCKWISE}
    assert set(_kernels(module, ExpertsOp)) == {Kernel.TILED}
    text = print_ir(module)
    assert "kernel = #dsv3<kernel blockwise>" in text and "kernel = #dsv3<kernel tiled>" in text
    assert print_ir(parse_ir(text)) == text


def test_keep_honours_a_choice_already_in_the_ir():
    module = _module("dsv3-kernels{attention=blockwise}")
    run_pipeline(module, "dsv3-kernels{attention=xla experts=ragged_dot keep=true}")
    assert set(_kernels(module, AttentionOp)) == {Kernel.BLOCKWISE}
    assert set(_kernels(module, ExpertsOp)) == {Kernel.RAGGED_DOT}


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("dsv3-kernels{attention=megablox}", "'dsv3.attention' has no kernel 'megablox'"),
        ("dsv3-kernels{experts=flash}", "unknown experts kernel 'flash'"),
    ],
)
def test_pass_refuses_kernels_an_op_does_not_have(pipeline, message):
    with pytest.raises(UserError, match=message):
        _module(pipeline)


def test_verifier_refuses_a_hand_edited_kernel_of_the_wrong_family():
    text = print_ir(_module("dsv3-kernels{attention=blockwise}")).replace("kernel blockwise", "kernel megablox", 1)
    with pytest.raises(SpecError, match="kernel 'megablox' is not one of this op's"):
        parse_ir(text)


def test_each_target_chooses_kernels_it_can_run():
    for name in ("cpu", "gpu-h100", "tpu-v5p-8"):
        target = resolve_target(name)
        assert set(target.kernels.values()) <= target.offers, name
    assert resolve_target("tpu-v5p-8").kernels["attention"] == Kernel.SPLASH
    assert resolve_target("gpu-h100").kernels["attention"] == Kernel.CUDNN
    # ahead of time on a host without a GPU, JAX's cuDNN checks allow at most 128-wide heads (V3's are 192)
    assert jax.default_backend() == "cpu"
    assert resolve_target("gpu-h100").kernels_pass("off").attention == "blockwise"


def test_a_kernel_the_target_cannot_run_is_refused_at_its_line_before_compiling(tmp_path):
    path = tmp_path / "splash.mlir"
    path.write_text(print_ir(_module("dsv3-kernels{attention=splash}")))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "kernel splash" in text)
    with pytest.raises(SpecError, match="target 'cpu' cannot run kernel 'splash'") as err:
        dsv3c.compile(path, target="cpu", mode="forward", batch=1, seq=8)
    assert err.value.line == line


def test_fp8_keeps_the_overlap_chunks_of_the_experts():
    module = _module("dsv3-overlap{chunks=4},dsv3-fp8-quant{block=16}")
    experts = [op for op in module.walk() if isinstance(op, ExpertsOp)]
    assert len(experts) == 2 and all(op.quantized and op.int_prop("chunks") == 4 for op in experts)


def _mla_inputs(seed: int, batch: int, seq: int, heads: int, nope: int, rope: int, v: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = ((batch, seq, heads, nope), (batch, seq, heads, rope), (batch, seq, heads, nope), (batch, seq, rope),
              (batch, seq, heads, v))
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize(("nope", "rope", "v"), [(16, 8, 16), (8, 4, 32)])
def test_cudnn_form_equals_the_plain_form_in_values_and_gradients(nope, rope, v):
    """The padding and concatenation around the fused call, run through XLA on the CPU (cuDNN itself needs a GPU):
    values as wide as the keys (V3's 128 < 192) or wider."""
    args = _mla_inputs(0, 2, 12, 3, nope, rope, v)
    scale = 0.3

    def fused(*a):
        return cudnn_mla_attention(*a, scale, implementation="xla")

    def plain(*a):
        return mla_attention(*a, scale)

    cotangent = jax.random.normal(jax.random.key(1), args[-1].shape)

    @jax.jit
    def value_and_vjp(*a):
        (ours, our_vjp), (theirs, their_vjp) = jax.vjp(fused, *a), jax.vjp(plain, *a)
        return ours, theirs, our_vjp(cotangent), their_vjp(cotangent)

    ours, theirs, our_grads, their_grads = value_and_vjp(*args)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(our_grads, their_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
