"""`dsv3-fuse-head-loss`: the output head and its cross-entropy fused into `dsv3.head_loss`, computed a slice of the
sequence at a time; the IR rewrite, and its value and gradients against the unfused ops and a NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ir_eval import ir_function

import dsv3c
from dsv3c.dialects.dsv3 import CrossEntropyOp, HeadLossGrads, HeadLossOp, MatmulOp
from dsv3c.dialects.text import print_ir
from dsv3c.frontend.errors import UserError
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.lower import losses


def test_pass_fuses_every_head_loss_and_keeps_logits_only_where_read():
    module = dsv3c.build_ir(dsv3c.load("examples/tiny.dsv3"))
    heads = [op for op in module.walk() if isinstance(op, MatmulOp) and op.w.type.get_shape()[-1] == 256]
    run_pipeline(module, "dsv3-fuse-head-loss{chunks=4}")
    fused = [op for op in module.walk() if isinstance(op, HeadLossOp)]
    assert len(fused) == 2 and not [op for op in module.walk() if isinstance(op, CrossEntropyOp)]  # LM and MTP
    assert all(op.int_prop("chunks") == 4 for op in fused)
    # the main head's logits are also a named output (forward steps return them): that matmul stays; the MTP
    # head's logits fed only its loss: gone
    remaining = [op for op in module.walk() if isinstance(op, MatmulOp) and op.w.type.get_shape()[-1] == 256]
    assert len(heads) == 2 and len(remaining) == 1


def test_pass_can_ask_for_the_gradients_in_the_forward_pass():
    module = dsv3c.build_ir(dsv3c.load("examples/tiny.dsv3"))
    run_pipeline(module, "dsv3-fuse-head-loss{chunks=2 grads=forward}")
    fused = [op for op in module.walk() if isinstance(op, HeadLossOp)]
    assert len(fused) == 2 and all(op.grads_when == HeadLossGrads.FORWARD for op in fused)
    assert "grads = #dsv3<head_loss_grads forward>" in print_ir(module)
    with pytest.raises(UserError, match="grads must be one of backward, forward, got 'later'"):
        run_pipeline(dsv3c.build_ir(dsv3c.load("examples/tiny.dsv3")), "dsv3-fuse-head-loss{grads=later}")


def test_pass_refuses_zero_chunks():
    with pytest.raises(UserError, match="chunks must be at least 1"):
        run_pipeline(dsv3c.build_ir(dsv3c.load("examples/tiny.dsv3")), "dsv3-fuse-head-loss{chunks=0}")


HEAD_LOSS = """builtin.module {
  func.func @f(%h: tensor<2x12x8xf32>, %w: tensor<8x40xf32>, %labels: tensor<2x12xi32>, %mask: tensor<2x12xf32>) -> tensor<f32> {
    %loss = dsv3.head_loss %h, %w, %labels, %mask {chunks = CHUNKS : i64GRADS} : (tensor<2x12x8xf32>, tensor<8x40xf32>, tensor<2x12xi32>, tensor<2x12xf32>) -> tensor<f32>
    func.return %loss : tensor<f32>
  }
}"""  # noqa: E501


def _numpy_loss_and_grads(h, w, labels, mask):
    """The mean masked cross-entropy of h @ w and its gradients in float64: d logits = (softmax - one-hot) mask / n."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    logits = h @ w
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    d_logits = (np.exp(logits - lse[..., None]) - np.eye(w.shape[1])[labels]) * (mask / mask.sum())[..., None]
    return (nll * mask).sum() / mask.sum(), d_logits @ w.T, np.einsum("bsd,bsv->dv", h, d_logits)


# chunks 5 does not divide 12: the largest divisor below it (4) is used
@pytest.mark.parametrize("grads", ["", ", grads = #dsv3<head_loss_grads forward>"], ids=["backward", "forward"])
@pytest.mark.parametrize("chunks", [1, 4, 5])
def test_head_loss_value_and_gradients(chunks, grads, monkeypatch):
    monkeypatch.setattr(losses, "FORWARD_SLICE_BYTES", 1)  # grads=forward slices even these tiny logits
    rng = np.random.default_rng(chunks)
    h = rng.standard_normal((2, 12, 8)).astype(np.float32)
    w = rng.standard_normal((8, 40)).astype(np.float32)
    labels = rng.integers(0, 40, (2, 12)).astype(np.int32)
    mask = (rng.random((2, 12)) > 0.2).astype(np.float32)
    fused = ir_function(HEAD_LOSS.replace("CHUNKS", str(chunks)).replace("GRADS", grads))

    def loss(h_, w_):
        return fused(h_, w_, labels, mask)[0]

    with jax.default_matmul_precision("highest"):
        value, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
        # the gradient of the unfused form, in JAX, as the second reference
        def unfused(h_, w_):
            logits = jnp.einsum("bsd,dv->bsv", h_, w_)
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
            return jnp.sum(nll * mask) / jnp.sum(mask)

        rh, rw = jax.grad(unfused, argnums=(0, 1))(h, w)
    numpy_loss, numpy_dh, numpy_dw = _numpy_loss_and_grads(h, w, labels, mask)
    np.testing.assert_allclose(float(value), numpy_loss, rtol=1e-6)
    np.testing.assert_allclose(dh, rh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dh, numpy_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numpy_dw, rtol=1e-5, atol=1e-7)
    # a weighted loss (the MTP loss is one): the gradients scale with the cotangent
    with jax.default_matmul_precision("highest"):
        sh, sw = jax.jit(jax.grad(lambda h_, w_: 0.3 * loss(h_, w_), argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(sh, 0.3 * numpy_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sw, 0.3 * numpy_dw, rtol=1e-5, atol=1e-7)
