"""The `packed` matmul kernel (`runtime/kernels/packed_matmul.py`): the values and gradients of a plain matmul, with
every GEMM of the weight gradient reading row-major operands, chosen in the IR for matmuls and the fused head."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3c
from dsv3c.dialects.dsv3 import HeadLossOp, MatmulOp
from dsv3c.dialects.kernels import Kernel
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.frontend.errors import SpecError
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.kernels.packed_matmul import packed_matmul
from dsv3c.runtime.lower.losses import head_loss, head_loss_forward_grads

TINY = "examples/tiny.dsv3"


def _problem(shape: tuple[int, ...], k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*shape, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    d_y = rng.standard_normal((*shape, n)).astype(np.float32)
    return x, w, d_y


@pytest.mark.parametrize("shape", [(48,), (2, 24)])
def test_values_and_gradients_equal_numpy(shape):
    x, w, d_y = _problem(shape, 40, 24)
    y, pullback = jax.vjp(lambda a, b: packed_matmul(a, b, jnp.float32), jnp.asarray(x), jnp.asarray(w))
    d_x, d_w = pullback(jnp.asarray(d_y))
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, d_y))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x, dy64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_w, x64.reshape(-1, 40).T @ dy64.reshape(-1, 24), rtol=1e-5, atol=1e-4)


def test_bf16_operands_accumulate_in_float32_as_the_plain_form():
    x, w, d_y = _problem((2, 16), 32, 64, seed=1)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def grads(matmul):
        return jax.grad(lambda a, b: jnp.sum(matmul(a, b) * d_y), argnums=(0, 1))(xb, wb)

    ours = grads(lambda a, b: packed_matmul(a, b, jnp.float32))
    plain = grads(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for a, b in zip(ours, plain, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


def test_bf16_products_read_transposed_compile_and_equal_numpy():
    """A bf16 x bf16 -> f32 product whose consumer reads it transposed: XLA would lay the product out transposed,
    which its fallback GEMM (DotThunk) cannot run in bf16 (`UNIMPLEMENTED`); the kernel's products keep row-major
    results. Both the output and the weight gradient are read transposed here."""
    x, w, d_y = _problem((64,), 32, 48, seed=3)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    @jax.jit
    def transposed(a, b, d):
        y, pullback = jax.vjp(lambda u, v: packed_matmul(u, v, jnp.float32), a, b)
        return y.T * 2.0, pullback(d)[1].T * 2.0

    y_t, d_w_t = transposed(xb, wb, jnp.asarray(d_y))
    x64, w64, dy64 = (np.float64(np.float32(a)) for a in (xb, wb, jnp.asarray(d_y, jnp.bfloat16)))
    np.testing.assert_allclose(y_t, 2 * (x64 @ w64).T, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.float32(d_w_t), 2 * (x64.T @ dy64).T, rtol=2e-2, atol=5e-2)


def test_the_bf16_weight_gradient_multiplies_bf16_operands():
    """The packed x^T keeps bf16 operands bf16 (a 2-D transpose would have XLA:CPU widen both to f32, at f32
    speed): the weight gradient's GEMM takes two bf16 operands."""
    x, w, d_y = _problem((64,), 32, 48, seed=4)
    x, w, d_y = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(d_y)
    grad = jax.jit(lambda a, b, d: jax.vjp(lambda v: packed_matmul(a, v, jnp.float32), b)[1](d)[0])
    text = grad.lower(x, w, d_y).compile().as_text()
    assert re.search(r"\(param_0[.\d]*: bf16\[32,64\], param_1[.\d]*: bf16\[64,48\]\) -> f32\[32,48\]", text)


def _dot_contractions(fn, *args) -> list[str]:
    """The lhs contracting dimensions of every dot XLA:CPU compiles for `fn`."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"\bdot\(.*?lhs_contracting_dims=\{(\d+)\}", text)


def test_the_weight_gradient_reads_a_row_major_left_operand():
    """The claim the kernel exists for: the plain form's weight gradient contracts its left operand's major axis
    (a transposed GEMM operand); the packed form's contracts the minor axis of a transposed copy."""
    x, w, d_y = (jnp.asarray(a) for a in _problem((64,), 32, 48))

    def weight_grad(matmul):
        return lambda a, b, d: jax.vjp(lambda v: matmul(a, v), b)[1](d)[0]

    plain = _dot_contractions(weight_grad(lambda a, b: a @ b), x, w, d_y)
    packed = _dot_contractions(weight_grad(lambda a, b: packed_matmul(a, b, jnp.float32)), x, w, d_y)
    assert plain == ["0"]
    assert packed == ["1"]


@pytest.mark.parametrize("forward", [False, True])
def test_the_packed_head_loss_equals_the_plain_one(forward):
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((16, 40)) / 4, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 40, (2, 8)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 8)) < 0.8, jnp.float32)
    loss = head_loss_forward_grads if forward else head_loss

    def value_and_grads(packed):
        return jax.value_and_grad(lambda a, b: 0.3 * loss(a, b, labels, mask, 4, packed), argnums=(0, 1))(h, head)

    (ours, ours_grads), (plain, plain_grads) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(ours, plain, rtol=1e-6)
    for a, b in zip(ours_grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_kernels_pass_chooses_it_for_matmuls_and_the_fused_head():
    module = dsv3c.build_ir(dsv3c.load(TINY))
    run_pipeline(module, "dsv3-fuse-head-loss,dsv3-kernels{matmul=packed}")
    kernels = {op.kernel_choice() for op in module.walk() if isinstance(op, MatmulOp | HeadLossOp)}
    assert kernels == {Kernel.PACKED}
    assert any(isinstance(op, HeadLossOp) for op in module.walk())
    text = print_ir(module)
    assert "kernel = #dsv3<kernel packed>" in text and print_ir(parse_ir(text)) == text


def test_the_fused_head_keeps_the_kernel_of_the_matmul_it_replaces():
    module = dsv3c.build_ir(dsv3c.load(TINY))
    run_pipeline(module, "dsv3-kernels{matmul=packed},dsv3-fuse-head-loss")
    assert {op.kernel_choice() for op in module.walk() if isinstance(op, HeadLossOp)} == {Kernel.PACKED}


def test_a_matmul_refuses_a_kernel_of_another_family():
    module = dsv3c.build_ir(dsv3c.load(TINY))
    run_pipeline(module, "dsv3-kernels{matmul=packed}")
    edited = print_ir(module).replace("kernel packed", "kernel tiled", 1)
    with pytest.raises(SpecError, match="kernel 'tiled' is not one of this op's"):
        parse_ir(edited)
