"""The pipeline pass: the cut it writes is the best contiguous cut (checked by enumerating every cut), its chunk
costs are DeepSeek-V3's FLOPs per token worked out by hand, the schedule's placement is in the IR, and what cannot be
cut or scheduled is refused with the reason."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest

import dsv3c
from dsv3c.dialects import dsv3
from dsv3c.dialects.pipeline import PipelineOp
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.frontend.errors import UserError
from dsv3c.passes.pipeline import balanced_cut
from dsv3c.pipeline import run_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _module(path: Path, passes: str):
    module = dsv3c.build_ir(dsv3c.parse(path.read_text(), str(path)))
    run_pipeline(module, passes)
    return module


def _brute_force(layers: list[float], chunks: int, prologue: float, epilogue: float) -> float:
    """The least cost of the costliest chunk over every contiguous cut with at least one layer a chunk."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(layers)), chunks - 1):
        bounds = [0, *cuts, len(layers)]
        costs = [sum(layers[a:b]) for a, b in itertools.pairwise(bounds)]
        costs[0] += prologue
        costs[-1] += epilogue
        best = min(best, max(costs))
    return best


def test_the_cut_is_the_best_contiguous_cut():
    rng = random.Random(0)
    for _ in range(200):
        n, chunks = rng.randint(2, 9), rng.randint(1, 4)
        if chunks > n:
            continue
        layers = [float(rng.randint(1, 20)) for _ in range(n)]
        prologue, epilogue = float(rng.randint(0, 10)), float(rng.randint(0, 30))
        ends = balanced_cut(layers, chunks, prologue, epilogue)
        assert len(ends) == chunks and ends[-1] == n and all(a < b for a, b in itertools.pairwise([0, *ends]))
        costs = [sum(layers[a:b]) for a, b in itertools.pairwise([0, *ends])]
        costs[0] += prologue
        costs[-1] += epilogue
        assert max(costs) == _brute_force(layers, chunks, prologue, epilogue), (layers, chunks, prologue, epilogue)


def _v3_flops_per_token(seq: int) -> dict[str, float]:
    """DeepSeek-V3's forward FLOPs per token by layer kind, from its shapes (REFERENCE.md): 2 per weight of every
    projection, routed experts at 8 of 256, causal attention at seq/2 keys per query."""
    dim, heads = 7168, 128
    mla = dim * 1536 + 1536 * heads * 192 + dim * (512 + 64) + 512 * heads * 256 + heads * 128 * dim
    attention = (seq / 2) * heads * (128 + 64 + 128)
    dense = 3 * dim * 18432
    moe = dim * 256 + 3 * dim * 2048 + 8 / 256 * 256 * 3 * dim * 2048
    head = dim * 129280
    return {"dense": 2 * (mla + dense + attention), "moe": 2 * (mla + moe + attention), "head": 2 * head,
            "mtp": 2 * (2 * dim * dim + mla + moe + attention + head)}


def test_deepseek_v3_under_dualpipev_is_cut_into_a_v_of_equal_chunks():
    """61 layers (3 dense, 58 MoE) into 8 chunks on 4 ranks: a dense layer costs about what a MoE layer does
    (18,432 active FFN columns each; the MoE router adds 0.3%), so chunk 0 takes the 3 dense and 5 MoE layers, six
    chunks 8 MoE layers, and the last chunk, which also carries the head and the MTP module, 5."""
    module = _module(EXAMPLES / "deepseek-v3-671b.dsv3", "dsv3-pipeline{ranks=4 schedule=dualpipev microbatches=8}")
    (pipeline,) = [op for op in module.ops if isinstance(op, PipelineOp)]
    assert pipeline.int_prop("ranks") == 4 and pipeline.int_prop("microbatches") == 8
    assert pipeline.chunk_ranks == [0, 1, 2, 3, 3, 2, 1, 0]  # the V: the first and last chunks on rank 0
    stacks = [op for op in module.walk() if isinstance(op, dsv3.LayerStackOp) and op.chunk_layers is not None]
    assert [s.layer_kind.data for s in stacks] == ["dense", "moe"]
    assert stacks[0].chunk_layers == [3, 0, 0, 0, 0, 0, 0, 0]
    assert stacks[1].chunk_layers == [5, 8, 8, 8, 8, 8, 8, 5]
    flops = _v3_flops_per_token(4096)
    assert flops["dense"] == pytest.approx(flops["moe"], rel=3e-3)
    expected = [3 * flops["dense"] + 5 * flops["moe"], *[8 * flops["moe"]] * 6,
                5 * flops["moe"] + flops["head"] + flops["mtp"]]
    assert pipeline.chunk_costs == pytest.approx(expected, abs=1)


def test_the_cut_round_trips_through_the_ir_text_and_a_bad_edit_is_caught():
    module = _module(EXAMPLES / "tiny.dsv3", "dsv3-pipeline{ranks=2 schedule=1f1b microbatches=4}")
    text = print_ir(module)
    assert '#dsv3<pipeline_schedule "1f1b">' in text and "chunks = [1 : i64, 0 : i64]" in text
    assert print_ir(parse_ir(text, "<pp>")) == text
    moe_chunks = re.findall(r"chunks = \[\d+ : i64, \d+ : i64\]", text)[1]
    with pytest.raises(Exception, match="must be layer counts that add up to count = 3"):
        parse_ir(text.replace(moe_chunks, "chunks = [1 : i64, 1 : i64]"), "<pp>").verify()


@pytest.mark.parametrize(("options", "message"), [
    ("ranks=2 schedule=pipedream", "unknown schedule 'pipedream'"),
    ("ranks=2 schedule=dualpipev microbatches=3", "micro-batches"),
    ("ranks=4 schedule=dualpipev", "4 layers cannot fill the 8 chunks of dualpipev on 4 ranks"),
])
def test_what_cannot_be_cut_or_scheduled_is_refused(options, message):
    with pytest.raises(UserError, match=message):
        _module(EXAMPLES / "tiny.dsv3", f"dsv3-pipeline{{{options}}}")


def test_a_pipelined_module_runs_forward_unpipelined():
    """Only the training step is pipelined; a forward pass of the same IR is the plain model's."""
    module = _module(EXAMPLES / "tiny.dsv3", "dsv3-pipeline{ranks=2}")
    plain = dsv3c.prepare(EXAMPLES / "tiny.dsv3", mode="forward", batch=1, seq=8, pipeline="")
    params = plain.init_params(0)
    tokens = np.arange(8, dtype=np.int32)[None]
    piped = dsv3c.prepare(module, mode="forward", batch=1, seq=8, pipeline="")
    np.testing.assert_array_equal(piped.forward(params, tokens), plain.forward(params, tokens))


def test_a_pipe_axis_adds_dualpipev_and_the_report_gives_its_bubble_and_timeline():
    prog = dsv3c.prepare(EXAMPLES / "tiny.dsv3", batch=8, seq=32, mesh={"pipe": 2}, devices=2)
    (op,) = [o for o in prog.module.ops if isinstance(o, PipelineOp)]
    assert (op.schedule.data, op.int_prop("ranks"), op.int_prop("microbatches")) == ("dualpipev", 2, 4)
    from dsv3c.pipeline_report import pipeline_report

    report = pipeline_report(prog.stages, 8, 32)
    # (P-1)(F&B + B - 2W) at F = B = W = 1 with a pair costing F + B + W: 1 x (3 + 1 - 2)
    assert report["bubble"] == report["bubble_formula"] == 2
    assert report["layers_per_chunk"] == {"dense": [1, 0, 0, 0], "moe": [0, 1, 1, 1]}
    assert report["activation_slot_bytes"] == 2 * 32 * 64 * 4  # a micro-batch of 2 x 32 tokens x dim 64, f32
    rows = report["timeline"].splitlines()
    assert len(rows) == 2 and rows[0].startswith("0 F0.0") and rows[1].startswith("1 .")
    # every forward and backward of 4 chunks x 4 micro-batches appears in the timeline
    assert sum(row.count("F") for row in rows) == 16
