"""Targets: names and slice sizes, ahead-of-time TPU compiles through libtpu topologies (no TPU here), and the
overlap pass's asynchronous all-to-alls with compute scheduled inside them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import dsv3c
from dsv3c.targets import CpuTarget, _tpu_shape, resolve_target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = dsv3c.load(EXAMPLES / "tiny.dsv3")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


@pytest.mark.parametrize(
    ("name", "chips", "hbm_gib", "fp8"),
    [("tpu-v5p-8", 4, 95, False), ("tpu-v5p-1024", 512, 95, False), ("tpu-v5e-16", 16, 16, False),
     ("tpu-v6e-8", 8, 32, False), ("gpu-h100", 0, 80, True), ("gpu-h200", 0, 141, True), ("cpu", 0, 0, False)],
)
def test_target_names(name, chips, hbm_gib, fp8):
    target = resolve_target(name)
    assert (target.chips, target.chip.hbm_bytes >> 30, target.chip.has_fp8) == (chips, hbm_gib, fp8)


def test_slice_shapes_follow_the_torus():
    assert [_tpu_shape("v5p", n) for n in (4, 8, 16, 64, 512)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (4, 4, 4), (8, 8, 8)]
    assert [_tpu_shape("v5e", n) for n in (1, 8, 256)] == [(1, 1), (2, 4), (16, 16)]


@pytest.mark.parametrize("name", ["tpu-v5p-6", "tpu-v5p-2", "tpu-v4-8", "tpu-v5e-3"])
def test_bad_target_names(name):
    with pytest.raises(dsv3c.UserError, match="slice size|unknown target"):
        resolve_target(name)


@pytest.fixture(scope="module")
def tpu_expert_parallel():
    """The tiny model's train step for a v5p-8 slice (4 chips), experts split 4 ways, overlap pass on."""
    return dsv3c.compile(TINY, target="tpu-v5p-8", batch=8, seq=64, mesh={"expert": 4})


@needs_libtpu
def test_tpu_compile_ahead_of_time_reports_per_device_memory(tpu_expert_parallel):
    report = tpu_expert_parallel.report
    assert (report["target"], report["devices"], report["mesh"]) == ("tpu-v5p-8", 4, {"expert": 4})
    assert report["fits_hbm"] and report["hbm_per_device_bytes"] == 95 << 30
    memory = report["memory_per_device_bytes"]
    assert 0 < memory["arguments"] < 8 * 289_112 * 4  # sharded: well under params + AdamW state in f32 on one chip
    bounds = report["step_time_bound_s"]  # a roofline bound, labelled as one: v5p peak 459 TFLOP/s, HBM 2.765 TB/s
    assert bounds["compute"] == pytest.approx(report["flops_per_step"] / (4 * 459e12))
    assert bounds["memory"] == pytest.approx(3 * memory["arguments"] / 2.765e12)
    parts = [bounds["compute"], bounds["memory"], bounds["collectives"]]
    assert (bounds["perfect_overlap"], bounds["no_overlap"]) == (pytest.approx(max(parts)), pytest.approx(sum(parts)))
    assert "not a prediction" in bounds["note"]
    assert report["mfu_upper_bound"] == pytest.approx(bounds["compute"] / bounds["perfect_overlap"])
    assert "dsv3-overlap{chunks=2 platform=\"tpu\"}" in report["pipeline"]
    with pytest.raises(dsv3c.UserError, match="compiled ahead of time"):
        tpu_expert_parallel.init_state(0)


@needs_libtpu
def test_tpu_attention_is_the_splash_kernel_forward_and_backward(tpu_expert_parallel):
    assert "kernel = #dsv3<kernel splash>" in tpu_expert_parallel.dumps[-3][1]  # the dsv3-kernels dump
    compiled = tpu_expert_parallel.compiled_text
    for call in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert call in compiled, call


@needs_libtpu
def test_tpu_all_to_alls_are_asynchronous_with_compute_inside(tpu_expert_parallel):
    a2a = tpu_expert_parallel.report["async_overlap"]["all-to-all"]
    assert a2a["count"] >= 6  # dispatch, routing data and combine, in two chunks, forward and backward
    assert a2a["with_compute"] >= a2a["count"] // 2
    assert a2a["mean_compute_ops_inside"] > 0
    schedule = next(line for line in tpu_expert_parallel.dumps[-3][1].splitlines() if "dsv3.schedule" in line)
    assert "xla_tpu_enable_async_all_to_all = true" in schedule


@needs_libtpu
def test_without_the_overlap_pass_all_to_alls_stay_synchronous():
    prog = dsv3c.compile(TINY, target="tpu-v5p-8", batch=8, seq=64, mode="forward", mesh={"expert": 4})
    assert "dsv3-overlap" not in prog.report["pipeline"]
    assert "all-to-all" not in prog.report["async_overlap"]
    assert prog.report["collectives"]["all-to-all"]["count"] >= 3


def test_prepared_programs_compile_with_the_targets_xla_options(monkeypatch, tmp_path):
    """`prepare` jits the programs that `compile` compiles ahead of time; both take the target's XLA options (and
    the IR's `dsv3.schedule` ones). Seen through an option with an effect outside the program: XLA dumps the
    optimized forward where the target's options tell it to."""
    monkeypatch.setattr(CpuTarget, "xla_options", {"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
    prog = dsv3c.prepare(TINY, mode="forward", batch=1, seq=8)
    assert prog.xla_options == CpuTarget.xla_options
    prog._forward.lower(prog.abstract_params(), jax.ShapeDtypeStruct((1, 8), jnp.int32)).compile()
    assert list(tmp_path.glob("*jit__logits*after_optimizations.txt"))
