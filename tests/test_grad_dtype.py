"""Weight gradients held in the compute dtype (`dsv3.optimizer`'s `grads`, `runtime/lower/weights.py`): the layer
scan stacks them in bf16 instead of f32, and they are the f32 path's gradients rounded to bf16 (the f32 path's own
values where its GEMM already rounded them). The memory this saves is measured on TPU in `benchmarks/`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv3c
from dsv3c.dialects import dsv3
from dsv3c.frontend.errors import SpecError
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.init import init_params
from dsv3c.runtime.model import param_infos, run_model
from dsv3c.runtime.train import make_loss_and_grads, split_params

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

# One MoE layer under bf16 compute: stacked attention, shared-expert (dense GEMMs) and routed-expert weights.
MODEL = """
model micro {{
  vocab 64
  dim 64
  layers 1 {{ dense_first 0 }}
  attention mla {{ heads 2, q_lora_rank 32, kv_lora_rank 32, head_dim {{ nope 16, rope 8, v 16 }} }}
  ffn dense {{ hidden 128 }}
  ffn moe {{ experts 4 {{ top_k 2, shared 1, hidden 64 }} }}
  dtype {{ params f32, compute bf16 }}
}}
train {{ optimizer adamw {{ {grads} }} }}
"""


def _module(grads: str):
    return dsv3c.build_ir(dsv3c.parse(MODEL.format(grads=grads)))


def _state(module):
    return split_params(param_infos(module), init_params(param_infos(module), 0))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 33)), jnp.int32)


def test_the_spec_sets_the_optimizer_attribute_and_compute_is_the_default():
    def grads_of(module) -> str:
        (optimizer,) = [op for op in module.ops if isinstance(op, dsv3.OptimizerOp)]
        return optimizer.grads.data

    assert grads_of(_module("grads f32")) == "f32"
    assert grads_of(_module("")) == "compute"
    with pytest.raises(SpecError, match="grads"):
        _module("grads bf16")


def _raw_gradient_dtypes(module) -> dict[str, str]:
    """The dtype of each parameter's gradient as the backward pass leaves it (before the step widens it), from
    shapes alone."""
    params = init_params(param_infos(module), 0)
    grads = jax.eval_shape(jax.grad(lambda p: run_model(module, p, TOKENS).loss), params)
    return {name: str(g.dtype) for name, g in grads.items()}


# The weights that a bf16 GEMM reads once: the layers' projections (stacked) and the untied output head. Norm scales
# and the router are read in f32, and the embedding by a lookup.
GEMM_WEIGHTS = {"head", "moe.experts_down", "moe.experts_gate", "moe.experts_up", "moe.shared_down",
                "moe.shared_gate", "moe.shared_up", "moe.wkv_a", "moe.wkv_b", "moe.wo", "moe.wq_a", "moe.wq_b"}
EXPERT_WEIGHTS = {"moe.experts_down", "moe.experts_gate", "moe.experts_up"}


def test_gemm_weights_leave_the_backward_pass_in_bf16_only_when_asked():
    kept = _raw_gradient_dtypes(_module("grads compute"))
    assert {name for name, dtype in kept.items() if dtype == "bfloat16"} == GEMM_WEIGHTS
    assert set(_raw_gradient_dtypes(_module("grads f32")).values()) == {"float32"}


def test_gradients_are_the_f32_paths_rounded_to_bf16():
    results = {}
    for grads in ("grads compute", "grads f32"):
        module = _module(grads)
        metrics, gradients = jax.jit(make_loss_and_grads(module))(_state(module), TOKENS)
        results[grads] = (float(metrics["loss"]), jax.tree.map(np.asarray, gradients))
    (loss, kept), (wide_loss, wide) = results["grads compute"], results["grads f32"]
    assert loss == wide_loss
    for name, g in kept.items():
        assert g.dtype == np.float32, name
        # The dense GEMMs' gradients are bf16 values on both paths. The grouped expert GEMM's are rounded to bf16
        # here; on the f32 path XLA skips its bf16 round trip (excess precision) and keeps the f32 accumulator.
        expected = wide[name].astype(ml_dtypes.bfloat16).astype(np.float32) if name in EXPERT_WEIGHTS else wide[name]
        np.testing.assert_array_equal(g, expected, err_msg=name)


def test_explicit_sharding_keeps_the_gathered_weights_gradients_in_bf16():
    """Explicit axes gather each weight where a GEMM reads it (`dsv3.shard`); the gradient keeps bf16 through it."""
    spec = dsv3c.parse(MODEL.format(grads=""))
    prog = dsv3c.prepare(spec, batch=4, seq=32, mesh={"fsdp": 2}, shard_mode="explicit", pipeline="")
    tokens = jax.ShapeDtypeStruct((4, 33), jnp.int32, sharding=prog._token_sharding)
    loss = lambda p, t: run_model(prog.module, p, t, prog.mesh, explicit=True).loss  # noqa: E731
    with prog._on_mesh():
        grads = jax.eval_shape(jax.grad(loss), prog.abstract_params(), tokens)
    assert {name for name, g in grads.items() if g.dtype == jnp.bfloat16} == GEMM_WEIGHTS


def test_fp8_gemms_leave_their_weights_gradients_in_bf16_too():
    """Under `dsv3-fp8-quant` the weights' gradients come from the FP8 GEMMs' own backward (FP32 block sums): with
    `grads compute` they leave it in bf16 (the FP8 step held f32 gradients for every quantised weight, 1.9x the BF16
    step's temporaries on the 671B), and are the `grads f32` path's rounded to bf16."""
    results = {}
    for grads in ("grads compute", "grads f32"):
        module = _module(grads)
        run_pipeline(module, "dsv3-fp8-quant{block=16}")
        params = init_params(param_infos(module), 0)
        raw = jax.eval_shape(jax.grad(lambda p, m=module: run_model(m, p, TOKENS).loss), params)
        results[grads] = ({n for n, g in raw.items() if g.dtype == jnp.bfloat16},
                          jax.jit(make_loss_and_grads(module))(_state(module), TOKENS)[1])
    assert results["grads compute"][0] == GEMM_WEIGHTS  # the head is not quantised: bf16 as without FP8
    assert results["grads f32"][0] == set()
    for name, g in results["grads compute"][1].items():
        wide = np.asarray(results["grads f32"][1][name])
        expected = wide.astype(ml_dtypes.bfloat16).astype(np.float32) if name in GEMM_WEIGHTS else wide
        np.testing.assert_array_equal(np.asarray(g), expected, err_msg=name)
