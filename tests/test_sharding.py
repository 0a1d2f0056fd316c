"""Sharded training on 8 simulated CPU devices against one device: same loss and gradients to 1e-5 under FSDP,
FSDP+TP, FSDP+EP (all-to-all dispatch) and explicit-axis sharding; mesh errors before compiling."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import dsv3c
from dsv3c.report import collectives
from dsv3c.runtime.data import SyntheticStream

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# tiny.dsv3 cut to one dense and one MoE layer: fewer ops to compile for each of the meshes below
TWO_LAYERS = (EXAMPLES / "tiny.dsv3").read_text().replace("layers 4 { dense_first 1 }", "layers 2 { dense_first 1 }")
SPEC = dsv3c.parse(TWO_LAYERS)
BATCH, SEQ = 8, 16


@pytest.fixture(scope="module")
def reference():
    """One device: the state, a batch, and the loss and gradients everything else must reproduce."""
    assert len(jax.devices()) >= 8, "conftest.py asks for 8 simulated CPU devices"
    prog = dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ)
    state = prog.init_state(0)
    state["router_bias"] = {  # nonzero correction biases, so routing depends on them as in training
        k: v + 0.01 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
        for k, v in state["router_bias"].items()
    }
    tokens = SyntheticStream(256, seed=5).batch(0, BATCH, SEQ + 1)
    metrics, grads = prog.loss_and_grads(state, {"tokens": tokens})
    host = jax.tree.map(np.asarray, state)
    return host, tokens, jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, grads)


MESHES = {
    "fsdp8": ({"fsdp": 8}, "auto"),
    "fsdp4-tp2": ({"fsdp": 4, "tensor": 2}, "auto"),
    "fsdp2-ep4": ({"fsdp": 2, "expert": 4}, "auto"),
    "explicit-fsdp2-tp2-ep2": ({"fsdp": 2, "expert": 2, "tensor": 2}, "explicit"),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_loss_and_gradients_match_one_device(name, reference):
    mesh, mode = MESHES[name]
    host, tokens, metrics, grads = reference
    prog = dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ, mesh=mesh, shard_mode=mode)  # the step is jitted, not AOT
    state = jax.tree.map(jax.device_put, host, prog.state_shardings)  # the reference values, laid out on the mesh
    got_metrics, got_grads = prog.loss_and_grads(state, {"tokens": tokens})
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
        np.testing.assert_allclose(np.asarray(got_metrics[key]), metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(got_metrics["expert_load"]), metrics["expert_load"])
    for key, expected in grads.items():
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(got_grads[key]), expected, rtol=1e-5, atol=1e-5 * scale, err_msg=key)
    assert len(prog.devices) == 8 and prog.mesh.shape == mesh
    if mesh.get("expert", 1) > 1:  # the jitted program just run, as XLA compiled it
        with prog._on_mesh():
            hlo = prog._loss_and_grads.lower(state, tokens).compile().as_text()
        assert collectives(hlo)["all-to-all"]["count"] >= 4  # tokens, their routing, the results: at least


def test_parameters_are_laid_out_as_the_ir_says():
    prog = dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ, mesh={"fsdp": 2, "expert": 2, "tensor": 2}, pipeline="")
    params = prog.init_params(0)
    specs = {name: tuple(params[name].sharding.spec) for name in ("moe.experts_gate", "embed", "head", "moe.wq_b")}
    assert specs["moe.experts_gate"][:3] == (None, "expert", "fsdp")  # [layers, exp, embed, mlp]: EP + FSDP
    assert specs["moe.experts_gate"][3] == "tensor"
    assert specs["embed"] == ("tensor", ("fsdp", "expert"))  # [vocab, embed]: expert serves as FSDP here
    assert specs["head"] == (("fsdp", "expert"), "tensor")  # [embed, vocab]
    assert specs["moe.wq_b"] == (None, ("fsdp", "expert"), "tensor")  # [layers, q_lora, q_heads]
    shard = params["moe.experts_gate"].addressable_shards[0].data
    assert shard.shape == (1, 8 // 2, 64 // 2, 32 // 2)


def test_mesh_that_does_not_divide_is_a_positioned_error(tmp_path):
    path = tmp_path / "m.dsv3"
    path.write_text((EXAMPLES / "tiny.dsv3").read_text())
    with pytest.raises(dsv3c.SpecError) as err:
        dsv3c.compile(path, batch=BATCH, seq=SEQ, mesh={"expert": 3})
    dim_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith("dim "))
    assert (err.value.path, err.value.line) == (str(path), dim_line)
    assert "mesh axes expert=3 (3 ways) do not divide 'embed' of size 64" in err.value.message


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"model": 2}, "unknown mesh axis 'model'"),
        ({"fsdp": 16}, "the mesh needs 16 CPU devices but JAX has 8"),
        ({"data": 8, "fsdp": 1}, "batch 4 does not divide over the batch mesh axes data = 8 devices"),
    ],
)
def test_impossible_meshes_are_user_errors(mesh, message):
    with pytest.raises(dsv3c.UserError, match=message):
        dsv3c.compile(SPEC, batch=4, seq=SEQ, mesh=mesh)


def test_group_limited_routing_reaches_at_most_keep_groups_devices():
    """With groups laid out along the expert axis (8 experts, 4 groups on 4 devices), every token's top-k experts live
    on at most keep_groups devices, so dispatch sends it to at most that many (DeepSeek-V3's node limit M)."""
    from dsv3c.runtime.lower.moe import route

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    bias = 0.1 * rng.standard_normal(8).astype(np.float32)
    _, indices, _ = route(x, w, bias, score="sigmoid", top_k=3, groups=4, keep_groups=2, scale=1.0, normalize=True)
    devices_per_token = [len(set(row)) for row in (np.asarray(indices).reshape(-1, 3) // 2).tolist()]
    assert max(devices_per_token) == 2


def test_sharding_an_already_sharded_module_replaces_its_decisions():
    from dsv3c.dialects.text import make_context, print_ir
    from dsv3c.pipeline import parse_pipeline

    module = dsv3c.build_ir(SPEC)
    parse_pipeline('dsv3-shard{mesh="fsdp=8"}').apply(make_context(), module)
    parse_pipeline('dsv3-shard{mesh="fsdp=2,tensor=4"}').apply(make_context(), module)
    text = print_ir(module)
    assert text.count("dsv3.mesh") == 1 and 'shape = [2 : i64, 4 : i64]' in text
    assert '{"fsdp"}, {}, {}, {}]' not in text and "fsdp=8" not in text



def test_ahead_of_time_shapes_carry_the_state_shardings():
    """`compile()` lowers from shapes; under explicit axes a shape without a sharding is traced as replicated, and the
    program then gathers every weight whole (measured: 4.2x auto mode's temporaries on a 4-layer V3, 1.02x with the
    shardings; `benchmarks/RESULTS.md`)."""
    prog = dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ, mesh={"fsdp": 8}, shard_mode="explicit")
    shapes = jax.tree.leaves(prog.abstract_state())
    shardings = jax.tree.leaves(prog.state_shardings)
    assert len(shapes) == len(shardings)
    assert all(shape.sharding == sharding for shape, sharding in zip(shapes, shardings, strict=True))
    assert any(not sharding.is_fully_replicated for sharding in shardings)
    assert {p.sharding for p in prog.abstract_params().values()} <= set(shardings)
