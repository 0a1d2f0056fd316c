"""`dsv3c plan` and the layout it writes: a spec's `parallel` block changes what a compile does (and an explicit
option still wins), the meshes tried, the analytic estimate against a hand count, the winner rule, the written spec
(byte for byte, and compiled to the winner's memory), and the command's exit codes.

The plan's own compiles are of `MINI`, a one-layer dense model whose ahead-of-time TPU compile takes seconds; they
run once, in a module fixture."""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.dialects.text import print_ir
from dsv3c.estimate import estimate, model_facts, refusal, stage_facts
from dsv3c.frontend.rewrite import parallel_block, with_parallel_block
from dsv3c.frontend.spec import ParallelSpec
from dsv3c.planner import PlanRow, choose_winner, meshes, pipe_sizes
from dsv3c.report import model_flops
from dsv3c.targets import CHIPS

# kv_lora_rank 6: 4 ways do not divide it, so fsdp=4 is refused by the shard pass; 2 ways do.
MINI = """\
# one dense layer: an ahead-of-time TPU compile of seconds
model mini {
  vocab 128
  dim 32
  layers 1
  attention mla {
    heads 2
    q_lora_rank 0
    kv_lora_rank 6
    head_dim { nope 8, rope 8, v 8 }
  }
  ffn dense { hidden 64 }
  dtype { params f32, compute f32 }
}
"""
BLOCK = "parallel {\n  mesh { tensor 2, fsdp 2 }\n  remat full\n  head_loss fused\n}\n"


def _mini(extra: str = "") -> dsv3c.ModelSpec:
    return dsv3c.parse(MINI + extra, "mini.dsv3")


# --------------------------------------------------------------------------------------------------------------------
# The parallel block as a compile's defaults (prepare: passes and mesh, no XLA)


def test_a_parallel_block_sets_the_mesh_and_the_train_passes():
    prog = dsv3c.prepare(_mini(BLOCK), target="cpu", batch=4, seq=32)
    assert dict(prog.mesh.shape) == {"fsdp": 2, "tensor": 2}
    assert prog.pipeline.startswith('dsv3-fuse-head-loss{chunks=8 grads="backward"},'
                                    'dsv3-remat{policy="full" keep=true},'
                                    'dsv3-shard{mesh="fsdp=2,tensor=2" mode="auto" rules=""}')
    forward = dsv3c.prepare(_mini(BLOCK), target="cpu", mode="forward", batch=4, seq=32)
    assert dict(forward.mesh.shape) == {"fsdp": 2, "tensor": 2} and "remat" not in forward.pipeline


def test_explicit_options_win_over_the_block():
    prog = dsv3c.prepare(_mini(BLOCK), target="cpu", batch=4, seq=32, mesh={"data": 4}, shard_mode="explicit",
                         pipeline="dsv3-remat{policy=deepseek}")
    assert dict(prog.mesh.shape) == {"data": 4} and prog.shard_mode == "explicit"
    assert prog.pipeline.startswith('dsv3-remat{policy="deepseek" keep=false},dsv3-shard{mesh="data=4" '
                                    'mode="explicit"')


def test_a_block_for_another_target_is_left_aside():
    notes: list[str] = []
    spec = _mini(BLOCK.replace("head_loss fused", "head_loss fused\n  target tpu-v5p-8"))
    assert spec.parallel is not None and spec.parallel.target == "tpu-v5p-8"
    prog = dsv3c.prepare(spec, target="cpu", batch=4, seq=32, log=notes.append)
    assert prog.mesh is None and 'policy="full"' not in prog.pipeline  # the CPU's own defaults
    assert "note: the parallel layout is for tpu-v5p-8; compiling for cpu without it" in notes


def test_a_mesh_that_does_not_match_the_chips_names_the_block(tmp_path, capsys):
    with pytest.raises(dsv3c.SpecError) as err:
        dsv3c.prepare(_mini("parallel {\n  mesh { fsdp 2 }\n}\n"), target="tpu-v5p-8", batch=4, seq=32)
    assert (err.value.line, err.value.col) == (16, 3)  # the `mesh` entry of the block
    assert "the parallel layout's mesh fsdp=2 has 2 devices, but target 'tpu-v5p-8' has 4 chips" in str(err.value)
    with pytest.raises(dsv3c.SpecError, match="the parallel layout's target: unknown target 'tpu-v9'"):
        dsv3c.prepare(_mini("parallel {\n  mesh { fsdp 2 }\n  target tpu-v9\n}\n"), target="cpu", batch=4, seq=32)
    # The same in an IR dump: the error is at the op's line, and a dump that matches compiles with its layout.
    ir = tmp_path / "mini.mlir"
    ir.write_text(print_ir(dsv3c.build_ir(_mini("parallel {\n  mesh { fsdp 2 }\n}\n"))))
    line = next(i for i, text in enumerate(ir.read_text().splitlines(), 1) if "dsv3.parallel" in text)
    assert main(["compile", str(ir), "--target", "tpu-v5p-8", "--batch", "4", "--seq", "32"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{ir}:{line}:3: error: the parallel layout's mesh fsdp=2 has 2 devices")
    assert dict(dsv3c.prepare(ir, target="cpu", batch=4, seq=32).mesh.shape) == {"fsdp": 2}


# --------------------------------------------------------------------------------------------------------------------
# Writing the block into a spec


def test_write_replaces_the_block_and_keeps_every_other_byte():
    layout = ParallelSpec({"fsdp": 2, "tensor": 2}, "auto", "full", "unfused", "tpu-v5p-8")
    block = parallel_block(layout, "planned")
    assert block == ("parallel {\n  # planned\n  mesh { fsdp 2, tensor 2 }\n  shard_mode auto\n  remat full\n"
                     "  head_loss unfused\n  target tpu-v5p-8\n}")
    appended = with_parallel_block(MINI, "mini.dsv3", block)
    assert appended == MINI + block + "\n" and dsv3c.parse(appended).parallel == layout
    mine = MINI.replace("model mini", "parallel { mesh { fsdp 4 }, remat none }  # mine \"}\"\nmodel mini") + "# end"
    replaced = with_parallel_block(mine, "mini.dsv3", block)
    assert replaced == mine.replace("parallel { mesh { fsdp 4 }, remat none }", block)
    assert dsv3c.parse(replaced).parallel == layout


# --------------------------------------------------------------------------------------------------------------------
# Enumeration, estimate, winner rule


EIGHT_CHIPS = """
data=8 fsdp=8 expert=8 tensor=8 tensor_transpose=8
data=2,fsdp=4 data=4,fsdp=2 data=2,expert=4 data=4,expert=2 data=2,tensor=4 data=4,tensor=2
data=2,tensor_transpose=4 data=4,tensor_transpose=2 fsdp=2,expert=4 fsdp=4,expert=2 fsdp=2,tensor=4 fsdp=4,tensor=2
fsdp=2,tensor_transpose=4 fsdp=4,tensor_transpose=2 expert=2,tensor=4 expert=4,tensor=2 expert=2,tensor_transpose=4
expert=4,tensor_transpose=2 tensor=2,tensor_transpose=4 tensor=4,tensor_transpose=2
fsdp=2,fsdp_transpose=4 fsdp=4,fsdp_transpose=2
data=2,fsdp=2,expert=2 data=2,fsdp=2,tensor=2 data=2,fsdp=2,tensor_transpose=2 data=2,expert=2,tensor=2
data=2,expert=2,tensor_transpose=2 data=2,tensor=2,tensor_transpose=2 fsdp=2,expert=2,tensor=2
fsdp=2,expert=2,tensor_transpose=2 fsdp=2,tensor=2,tensor_transpose=2 expert=2,tensor=2,tensor_transpose=2
data=2,fsdp=2,fsdp_transpose=2 fsdp=2,fsdp_transpose=2,expert=2 fsdp=2,fsdp_transpose=2,tensor=2
fsdp=2,fsdp_transpose=2,tensor_transpose=2
"""


def test_the_meshes_of_eight_chips():
    def text(mesh: dict[str, int]) -> str:
        return ",".join(f"{a}={n}" for a, n in mesh.items())

    moe = [text(m) for m in meshes(8, moe=True)]
    assert sorted(moe) == sorted(EIGHT_CHIPS.split()) and len(moe) == 41
    assert sorted(text(m) for m in meshes(8, moe=False)) == sorted(m for m in moe if "expert" not in m)
    assert meshes(1, moe=True) == [{"fsdp": 1}]


def test_the_estimate_counts_parameters_optimizer_and_gradients_by_hand():
    """MINI's parameters from its spec: per layer attn_norm 32, wq 32x2x16, wkv_a 32x(6+8), kv_norm 6,
    wkv_b 6x2x16, wo 16x32, ffn_norm 32, gate/up/down 3x32x64; embed and head 128x32 each, final_norm 32. On
    `tensor=2` the vocab, head, MLP and head-split dimensions halve; the norms and wkv_a are replicated."""
    module = dsv3c.build_ir(_mini())
    model = model_facts(module)
    split = 32 * 2 * 16 + 6 * 2 * 16 + 16 * 32 + 3 * 32 * 64 + 2 * 128 * 32
    replicated = 32 + 32 * 14 + 6 + 32 + 32
    flops = model_flops(module, 4, 32, train=True)
    e = estimate(model, {"tensor": 2}, "full", False, batch=4, seq=32, flops=flops, chip=CHIPS["v5p"])
    assert e.params == 4 * (split // 2 + replicated)  # f32
    assert e.optimizer == 2 * e.params  # f32 moments: mu and nu
    assert e.gradients == e.params  # compute f32
    fsdp = estimate(model, {"fsdp": 2}, "full", False, batch=4, seq=32, flops=flops, chip=CHIPS["v5p"])
    assert fsdp.params == 4 * (split + replicated) // 2  # every dimension FSDP can take is even
    # Full recompute keeps each layer's input, [batch 2 per device, 32, 32] in f32; no recompute keeps more.
    none = estimate(model, {"fsdp": 2}, "none", False, batch=4, seq=32, flops=flops, chip=CHIPS["v5p"])
    assert model.saved["full"][0].shape == (-1, -1, 32) and none.activations > fsdp.activations


def test_pipe_meshes_split_the_rest_of_the_chips_behind_the_pipe_axis():
    assert pipe_sizes(8, layers=4) == [2] and pipe_sizes(8, layers=16) == [2, 4, 8] and pipe_sizes(6, 61) == [2]
    plain = meshes(4, moe=True)
    piped = [m for m in meshes(8, moe=True, pipes=[2]) if "pipe" in m]
    assert sorted(map(str, piped)) == sorted(str({"pipe": 2, **m}) for m in plain)
    assert {"pipe": 4} in meshes(4, moe=True, pipes=[4])


def test_a_pipelined_estimate_holds_what_the_compiled_stage_layout_holds():
    """Parameters and AdamW moments per device are the staged training state's shards, as the pipelined program
    places them (tiny on pipe=2,fsdp=2: DualPipeV's four chunks, each rank's rows padded to the widest band,
    embedding, head and MTP whole on both ranks); the gradients an f32 accumulator of the same shards plus one
    band's gradients of the stacked weights; with a bubble, the pipelined step takes longer than the plain one."""
    spec = dsv3c.load("examples/tiny.dsv3")
    module = dsv3c.build_ir(spec)
    model = model_facts(module)
    stages = stage_facts(module, 2)
    flops = model_flops(module, 8, 32, train=True)
    mesh = {"pipe": 2, "fsdp": 2}
    e = estimate(model, mesh, "full", False, batch=8, seq=32, flops=flops, chip=CHIPS["v5p"], stages=stages)
    prog = dsv3c.prepare(spec, batch=8, seq=32, mesh=mesh, devices=4)
    assert prog.stages is not None and prog.stages.schedule.name == "dualpipev"
    state = prog.abstract_state()

    def per_device(tree) -> int:  # the arrays' shards (not the optimizer's step counters)
        return sum(math.prod(v.sharding.shard_shape(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(tree)
                   if v.ndim)

    assert e.params == per_device(state["params"]) + per_device(state["router_bias"])
    assert e.optimizer == per_device(state["opt_state"])
    band = sum(math.prod(v.sharding.shard_shape(v.shape)[2:]) * stages.band[n] * 4
               for n, v in state["params"].items() if n in stages.band)
    assert e.gradients == per_device(state["params"]) + band  # f32 compute: the band's gradients are f32 too
    plain = estimate(model, {"fsdp": 4}, "full", False, batch=8, seq=32, flops=flops, chip=CHIPS["v5p"])
    assert e.step_time_s > plain.step_time_s and stages.bubble_fraction > 0


def test_a_pipelined_layout_is_refused_where_the_micro_batches_do_not_divide():
    module = dsv3c.build_ir(dsv3c.load("examples/tiny.dsv3"))
    model, stages = model_facts(module), stage_facts(module, 2)
    assert refusal(model, {"pipe": 2, "fsdp": 2}, 8, stages) is None
    assert "into the pipeline's 4 micro-batches" in refusal(model, {"pipe": 2, "fsdp": 2}, 6, stages)
    assert "a micro-batch of 2 sequences" in refusal(model, {"pipe": 2, "fsdp": 4}, 8, stages)


def _row(bound: float, total: int, status: str = "fits") -> PlanRow:
    layout = ParallelSpec({"fsdp": 4}, "auto", "full", "unfused")
    return PlanRow(layout, status, memory={"total": total}, step_time_bound_s={"perfect_overlap": bound})


def test_the_winner_is_the_least_memory_among_the_fastest():
    fast, lean, slow_lean = _row(1.0, 10), _row(1.03, 5), _row(1.2, 1)
    assert choose_winner([fast, lean, slow_lean]) is lean  # within 5% of the best bound
    assert choose_winner([fast, slow_lean]) is fast
    assert choose_winner([_row(0.5, 1, "does not fit"), fast]) is fast
    assert choose_winner([_row(1.0, 1, "out of memory")]) is None


# --------------------------------------------------------------------------------------------------------------------
# The command: one plan of MINI on a v5p-8 slice, compiled ahead of time


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """`dsv3c plan mini.dsv3 --target tpu-v5p-8 --batch 4 --seq 32 --max-compiles 2 --json --write-spec OUT`: its
    exit code, JSON, progress lines and the written spec."""
    folder = tmp_path_factory.mktemp("plan")
    spec, out = folder / "mini.dsv3", folder / "planned.dsv3"
    spec.write_text(MINI)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["plan", str(spec), "--target", "tpu-v5p-8", "--batch", "4", "--seq", "32", "--max-compiles", "2",
                     "--json", "--write-spec", str(out)])
    return code, json.loads(stdout.getvalue()), stderr.getvalue(), out


def test_plan_compiles_the_best_layouts_and_names_a_winner(planned):
    code, doc, progress, _ = planned
    assert code == 0 and (doc["target"], doc["chips"], doc["batch"], doc["seq"]) == ("tpu-v5p-8", 4, 4, 32)
    rows = doc["rows"]
    compiled = [r for r in rows if r["compile_seconds"] is not None]
    assert len(compiled) == 2 and rows[0]["winner"] and rows[0]["status"] == "fits"
    assert doc["winner"] == rows[0]["label"] and sum(r["winner"] for r in rows) == 1
    for row in compiled:
        assert f"compiling {row['label']} ..." in progress and f"{row['label']}: " in progress
    assert "[1/2] compiling " in progress and "[2/2] compiling " in progress and " GiB, fits, step >= " in progress
    assert {r["status"] for r in rows} == {"fits", "not compiled", "refused"}
    assert all(r["estimate_bytes"]["total"] <= 95 << 30 for r in rows if r["status"] == "not compiled")


def test_a_refused_layout_carries_the_shard_pass_message(planned):
    _, doc, _, _ = planned
    (row,) = [r for r in doc["rows"] if r["label"] == "fsdp=4 auto remat=full"]
    assert row["status"] == "refused"
    with pytest.raises(dsv3c.SpecError) as err:
        dsv3c.prepare(_mini(), target="tpu-v5p-8", batch=4, seq=32, mesh={"fsdp": 4})
    assert row["reason"] == f"dsv3-shard: {err.value.message}"
    assert err.value.message == "parameter 'dense.kv_norm': mesh axes fsdp=4 (4 ways) do not divide 'kv_lora' of size 6"


def test_the_written_spec_compiles_to_the_winners_memory(planned):
    """The spec written keeps every byte of the input and adds the winner's block; compiled on its own, with no
    options, it has the winner's mesh and exactly the memory the plan's row shows."""
    _, doc, _, out = planned
    winner = doc["rows"][0]
    text = out.read_text()
    block = text[len(MINI):]
    assert text.startswith(MINI) and block.startswith("parallel {\n  # dsv3c plan --target tpu-v5p-8 --batch 4")
    spec = dsv3c.load(out)
    assert spec.parallel is not None and spec.parallel.mesh == winner["layout"]["mesh"]
    assert (spec.parallel.remat, spec.parallel.target) == (winner["layout"]["remat"], "tpu-v5p-8")
    report = dsv3c.compile(out, target="tpu-v5p-8", batch=4, seq=32).report
    assert report["mesh"] == winner["layout"]["mesh"]
    assert report["memory_per_device_bytes"] == winner["memory_per_device_bytes"]
    assert report["step_time_bound_s"]["perfect_overlap"] == winner["step_time_bound_s"]["perfect_overlap"]


def test_plan_exits_1_when_nothing_fits(tmp_path, capsys):
    """1024 sequences of 1M tokens on 4 chips: each layer's input alone is 32 GiB a chip, above a v5e's 16 GiB, so
    every layout is pruned by the estimate and nothing is compiled."""
    spec, out = tmp_path / "mini.dsv3", tmp_path / "out.dsv3"
    spec.write_text(MINI)
    args = ["plan", str(spec), "--target", "tpu-v5e-4", "--batch", "1024", "--seq", str(1 << 20)]
    assert main([*args, "--write-spec", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("no layout fits") and "0 compiled" in captured.out
    assert "pruned: the estimate is above HBM: " in captured.out and not out.exists()
    rows = dsv3c.plan(spec, "tpu-v5e-4", batch=1024, seq=1 << 20)  # the same, from Python
    assert {r.status for r in rows} == {"pruned", "refused"} and not any(r.winner for r in rows)
    assert all(r.estimate.total > 16 << 30 for r in rows if r.status == "pruned")


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "tpu-v9-8"], "unknown target 'tpu-v9-8'"),
    (["--target", "cpu"], "plan needs a target whose chips' memory is known"),
    (["--target", "gpu-h100"], "target 'gpu-h100' does not fix its number of chips: give it (--devices N)"),
    (["--target", "tpu-v5p-8", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--target", "tpu-v5p-8", "--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
])
def test_plan_refuses_bad_input_with_exit_2(args, message, tmp_path, capsys):
    spec = tmp_path / "mini.dsv3"
    spec.write_text(MINI)
    command = ["plan", str(spec), "--batch", "4", "--seq", "32", *args]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dsv3c: error: ") and message in error


def test_write_spec_needs_a_spec(tmp_path, capsys):
    ir = tmp_path / "mini.mlir"
    ir.write_text(print_ir(dsv3c.build_ir(_mini())))
    assert main(["plan", str(ir), "--target", "tpu-v5p-8", "--batch", "4", "--seq", "32", "--write-spec",
                 str(tmp_path / "x.dsv3")]) == 2
    assert "INPUT must be a .dsv3 file, not IR" in capsys.readouterr().err
