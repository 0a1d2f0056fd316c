"""The recompute pass: every policy gives the gradients of no recompute, trades compiled memory the way it says,
and offloads the values it names to host memory. (The IR rewrite itself: `tests/filecheck/remat.mlir`.)"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from xdsl.dialects.builtin import StringAttr
from xdsl.utils.exceptions import VerifyException

import dsv3c
from dsv3c.dialects.remat import CheckpointOp, RematAction
from dsv3c.dialects.text import print_ir
from dsv3c.frontend.errors import UserError
from dsv3c.passes.remat import RematPass, expert_flops_per_byte
from dsv3c.pipeline import pipeline_text, run_pipeline
from dsv3c.runtime.init import init_params
from dsv3c.runtime.kernels.blockwise_attention import blockwise_attention
from dsv3c.runtime.kernels.grouped_gemm_cpu import tiled_grouped_gemm
from dsv3c.runtime.lower.experts import routed_experts
from dsv3c.runtime.lower.remat import KERNEL_RESIDUALS
from dsv3c.runtime.model import param_infos, run_model
from dsv3c.targets import resolve_target

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

# One dense and one MoE layer with MLA: every kind of op a layer holds, small enough to compile in seconds.
MICRO = """
model micro {
  vocab 64
  dim 32
  layers 2 { dense_first 1 }
  attention mla { heads 2, q_lora_rank 16, kv_lora_rank 16, head_dim { nope 8, rope 4, v 8 } }
  ffn dense { hidden 64 }
  ffn moe { experts 4 { top_k 2, shared 1, hidden 16 } }
  dtype { params f32, compute f32 }
}
"""

# Dense layers wide and long enough that the saved activations dominate the compiled temporaries.
DENSE = """
model dense {
  vocab 256
  dim 256
  layers 4
  attention mla { heads 4, q_lora_rank 192, kv_lora_rank 128, head_dim { nope 32, rope 16, v 32 } }
  ffn dense { hidden 512 }
  dtype { params f32, compute f32 }
}
"""


# The CPU's kernels, whose forward residuals `kernels=attention,experts` keeps: blockwise attention, expert tiles.
KERNELS = "dsv3-kernels{attention=blockwise experts=tiled}"


def _module(text: str, pipeline: str):
    module = dsv3c.build_ir(dsv3c.parse(text))
    run_pipeline(module, pipeline)
    return module


def _loss_and_grads(pipeline: str) -> tuple[float, dict[str, np.ndarray]]:
    module = _module(MICRO, pipeline)
    params = init_params(param_infos(module), 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 17)), jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: run_model(module, p, tokens).loss))(params)
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def reference() -> tuple[float, dict[str, np.ndarray]]:
    return _loss_and_grads("")


@pytest.mark.parametrize(
    "pipeline",
    [
        "dsv3-remat{policy=deepseek}",
        "dsv3-remat{policy=full save=c_kv,k_pe}",
        "dsv3-remat{policy=deepseek offload=attn,h}",
        f"dsv3-remat{{policy=deepseek kernels=attention,experts}},{KERNELS}",
    ],
)
def test_gradients_equal_those_without_recompute(pipeline, reference) -> None:
    module = _module(MICRO, pipeline)
    assert all(op.remat is not None for op in module.walk() if isinstance(op, dsv3c.dialects.dsv3.LayerStackOp))
    loss, grads = _loss_and_grads(pipeline)
    ref_loss, ref_grads = reference
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, ref_grads[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_temp_memory_follows_the_policy() -> None:
    """none keeps everything; deepseek recomputes the RMSNorm and MLA up-projection outputs (and what is inside ops,
    the attention probabilities); full keeps nothing but each layer's input. (`benchmarks/remat.py` adds the
    `outputs` policy, which separates the two parts of deepseek's saving.)"""
    spec = dsv3c.parse(DENSE)
    temp = {}
    for policy in ("none", "deepseek", "full"):
        prog = dsv3c.compile(spec, mode="train", batch=2, seq=256, pipeline=f"dsv3-remat{{policy={policy}}}")
        temp[policy] = prog.report["memory_per_device_bytes"]["temp"]
    margin = 0.1 * temp["none"]
    assert temp["none"] - margin > temp["deepseek"] > temp["full"] + margin, temp


def test_default_train_pipeline_is_deepseeks_and_keeps_a_policy_in_the_ir() -> None:
    cpu = resolve_target("cpu")
    assert cpu.default_passes("train")[1] == RematPass(policy="deepseek", kernels=("auto",), keep=True)
    assert resolve_target("gpu-h100").default_passes("train") == [RematPass(policy="deepseek", keep=True)]
    assert "remat" not in pipeline_text(cpu.default_passes("forward") + cpu.default_passes("prefill"))
    module = _module(MICRO, "dsv3-remat{policy=full}")
    run_pipeline(module, cpu.default_passes("train"))
    actions = {op.action.data for op in module.walk() if isinstance(op, CheckpointOp)}
    assert actions == {RematAction.RECOMPUTE}


def _offloaded_residuals(pipeline: str) -> int:
    """How many values the backward pass moves to host memory, read off the jaxpr of the gradient."""
    module = _module(MICRO, pipeline)
    infos = param_infos(module)
    params = {name: jax.ShapeDtypeStruct(i.shape, i.dtype) for name, i in infos.items()}
    tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, t: run_model(module, p, t).loss))(params, tokens)
    return str(jaxpr).count("devices=(MemorySpace.Host,)")


def test_offload_moves_the_named_values_to_host() -> None:
    assert _offloaded_residuals("dsv3-remat{policy=deepseek}") == 0
    # attn and h in each of the two layer stacks (dense, MoE). XLA:CPU has one memory, where the copies are no-ops:
    # there the program compiles and gives the same gradients (test above), and saves nothing.
    assert _offloaded_residuals("dsv3-remat{policy=deepseek offload=attn,h}") == 4


def _saved_names(f, *args, kernel: str, capsys) -> set[str]:
    """The names of the residuals `f` keeps for its backward, checkpointed with `kernel`'s residuals saved."""
    policy = jax.checkpoint_policies.save_only_these_names(*KERNEL_RESIDUALS[kernel])
    print_saved_residuals(jax.checkpoint(f, policy=policy), *args)
    return set(re.findall(r"named '([^']+)'", capsys.readouterr().out))


def test_saving_kernel_residuals_keeps_what_the_kernels_backward_reads(capsys) -> None:
    """With `kernels=attention,experts` backward reads the blockwise attention's output and log-sum-exp and the
    routed experts' sort and its inverse, sorted rows, group sizes and hidden activations instead of running their
    forwards again (the gradients are those without recompute: above). The stacks say so in the IR, and the
    verifier refuses it where the policy keeps nothing."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    attention = _saved_names(lambda *qkv: blockwise_attention(*qkv, 0.25).sum(), normal(1, 64, 2, 8),
                             normal(1, 64, 2, 4), normal(1, 64, 2, 8), normal(1, 64, 4), normal(1, 64, 2, 8),
                             kernel="attention", capsys=capsys)
    assert attention == {"blockwise_attention.out", "blockwise_attention.lse"}, attention
    indices = jnp.asarray(rng.integers(0, 4, (2, 8, 2)), jnp.int32)
    experts = _saved_names(
        lambda x, *w: routed_experts(x, jnp.ones((2, 8, 2)), indices, *w, tiled_grouped_gemm).sum(),
        normal(2, 8, 16), normal(4, 16, 8), normal(4, 16, 8), normal(4, 8, 16), kernel="experts", capsys=capsys)
    assert experts == {f"experts.{n}" for n in ("order", "inverse", "rows", "sizes", "gate", "up", "hidden")}, experts
    module = _module(MICRO, "dsv3-remat{kernels=attention,experts}")
    assert 'kernel_residuals = ["attention", "experts"]' in print_ir(module)
    stacks = [op for op in module.walk() if isinstance(op, dsv3c.dialects.dsv3.LayerStackOp)]
    assert len(stacks) == 2 and all(
        [k.data for k in op.kernel_residuals.data] == ["attention", "experts"] for op in stacks)
    stacks[0].properties["remat"] = StringAttr("full")  # a hand edit the verifier refuses
    with pytest.raises(VerifyException, match="kernel_residuals needs a recompute policy"):
        stacks[0].verify()


def test_auto_kernels_keep_the_experts_residuals_by_their_flops_per_byte() -> None:
    """`kernels=auto` keeps attention's residuals in every stack that has attention, and the experts' where their
    forward costs at least 32 FLOPs per byte of residual: 6 D H / (4 (2 D + 3 H)) in float32."""
    def chosen(spec: str) -> list[list[str]]:
        module = _module(spec, "dsv3-remat{kernels=auto}")
        stacks = [op for op in module.walk() if isinstance(op, dsv3c.dialects.dsv3.LayerStackOp)]
        return [[k.data for k in op.kernel_residuals.data] for op in stacks]

    def ratio(dim: int, hidden: int) -> float:
        return 6 * dim * hidden / (4 * (2 * dim + 3 * hidden))

    assert ratio(32, 16) < 32 and chosen(MICRO) == [["attention"], ["attention"]]
    wide = MICRO.replace("dim 32", "dim 256").replace("hidden 16", "hidden 128")
    assert ratio(256, 128) >= 32 and chosen(wide) == [["attention"], ["attention", "experts"]]
    module = _module(wide, "dsv3-remat")
    (experts,) = [op for op in module.walk() if isinstance(op, dsv3c.dialects.dsv3.ExpertsOp)]
    assert expert_flops_per_byte(experts) == pytest.approx(ratio(256, 128))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu for a TPU compile")
def test_offload_puts_the_named_values_in_tpu_host_memory() -> None:
    """Against a real TPU compiler (ahead of time), offloaded residuals live in host memory space S(5)."""
    spec = dsv3c.parse(MICRO)
    kept = dsv3c.compile(spec, target="tpu-v5e-1", mode="train", batch=2, seq=16, pipeline="dsv3-remat")
    offloaded = dsv3c.compile(spec, target="tpu-v5e-1", mode="train", batch=2, seq=16,
                              pipeline="dsv3-remat{offload=attn,h}")
    assert "S(5)" not in kept.compiled_text
    assert "S(5)" in offloaded.compiled_text
    assert "pinned_host" in offloaded.stablehlo


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("dsv3-remat{policy=sideways}", "unknown policy 'sideways'"),
        ("dsv3-remat{policy=full save=nosuch}", "no layer has a value named ['nosuch']"),
        ("dsv3-remat{policy=full save=h offload=h}", "'h' is listed under both save and offload"),
        ("dsv3-remat{policy=none offload=h}", "policy none keeps everything"),
        ("dsv3-remat{policy=full kernels=attention}", "kernels= needs a policy that keeps values"),
        ("dsv3-remat{kernels=attention,maybe}", "kernels=maybe \\(expected attention, experts, or auto alone\\)"),
        ("dsv3-remat{kernels=auto,attention}", "kernels=auto \\(expected attention, experts, or auto alone\\)"),
    ],
)
def test_bad_options_are_user_errors(pipeline, message) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _module(MICRO, pipeline)
