"""The dsv3 IR as a user-facing artifact: it prints and parses back exactly, its verifiers reject hand edits that break
an invariant with the position of the offending op, hand edits that keep it valid change the compiled program as
they say, `dsv3c opt` and `--dump-ir` expose the passes, and the IR of a deep model is no bigger than a shallow one's.

XLA compiles cost seconds each, so they are few and shared through module-scoped fixtures."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.pipeline import run_pipeline
from dsv3c.report import count_params
from dsv3c.runtime.model import ParamInfo, param_infos, run_model
from dsv3c.targets import resolve_target

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# A small DeepSeek-V3-shaped spec: one dense layer, two MoE layers (8 experts, top-2 of 2 groups), one MTP module.
# The init std is large so that routing changes show in the logits. Activations ending in 2 (`tensor<?x?x2xf32>`,
# `tensor<?x?x2xi32>`) are then the router's [B,S,top_k] results only: the 2 heads give `tensor<?x?x2x8xf32>`.
SMALL_SPEC = """\
model small {
  vocab 64
  dim 16
  layers 3 { dense_first 1 }
  attention mla {
    heads 2
    q_lora_rank 8
    kv_lora_rank 8
    head_dim { nope 4, rope 4, v 4 }
    rope { theta 10000 }
  }
  ffn dense { hidden 32 }
  ffn moe {
    experts 8 { top_k 2, shared 1, hidden 8 }
    routing sigmoid { groups 2, keep_groups 2, bias true }
    balance { bias_rate 0.01, seq_aux 0.0001 }
  }
  mtp { depth 1, weight 0.3 }
  init { std 0.2 }
  dtype { params f32, compute f32 }
}
"""
BATCH, SEQ = 2, 8
TOP_K, EXPERTS, MOE_LAYERS = 2, 8, 2

# A hand-written module that uses most dsv3 ops (a two-layer MoE stack with a toy attention, a tied head, the
# losses). It is valid and runs; each verifier case below breaks it in one place.
BASE_IR = """\
builtin.module {
  dsv3.optimizer {kind = "adamw", lr = 1.000000e-03 : f64, b1 = 9.000000e-01 : f64, b2 = 9.500000e-01 : f64, eps = 1.000000e-08 : f64, weight_decay = 0.000000e+00 : f64, clip = 1.000000e+00 : f64, moments = "f32", grads = "compute", schedule = "constant", warmup = 0 : i64, decay_steps = 0 : i64, min_lr_ratio = 1.000000e+00 : f64}
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %pos = dsv3.positions %ids : (tensor<?x?xi32>) -> tensor<?x?xi32>
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<32x16xf32>
    %x = dsv3.embed %table, %ids : (tensor<32x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %norm = dsv3.param {name = "moe.norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<2x16xf32>
    %wq = dsv3.param {name = "moe.wq", axes = ["layers", "embed", "q_heads"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x16x16xf32>
    %wo = dsv3.param {name = "moe.wo", axes = ["layers", "heads", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x8x16xf32>
    %router = dsv3.param {name = "moe.router", axes = ["layers", "embed", "exp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x16x4xf32>
    %bias = dsv3.param {name = "moe.router_bias", axes = ["layers", "exp"], init = "zeros", trainable = false} : tensor<2x4xf32>
    %gate = dsv3.param {name = "moe.experts_gate", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x16x8xf32>
    %up = dsv3.param {name = "moe.experts_up", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x16x8xf32>
    %down = dsv3.param {name = "moe.experts_down", axes = ["layers", "exp", "mlp", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x8x16xf32>
    %h, %aux, %load = dsv3.layer_stack %x, %norm, %wq, %wo, %router, %bias, %gate, %up, %down {count = 2 : i64, kind = "moe"} : (tensor<?x?x16xf32>, tensor<2x16xf32>, tensor<2x16x16xf32>, tensor<2x8x16xf32>, tensor<2x16x4xf32>, tensor<2x4xf32>, tensor<2x4x16x8xf32>, tensor<2x4x16x8xf32>, tensor<2x4x8x16xf32>) -> (tensor<?x?x16xf32>, tensor<2xf32>, tensor<2x4xf32>) {
    ^bb0(%hl: tensor<?x?x16xf32>, %norm_l: tensor<16xf32>, %wq_l: tensor<16x16xf32>, %wo_l: tensor<8x16xf32>, %router_l: tensor<16x4xf32>, %bias_l: tensor<4xf32>, %gate_l: tensor<4x16x8xf32>, %up_l: tensor<4x16x8xf32>, %down_l: tensor<4x8x16xf32>):
      %xn = dsv3.rms_norm %hl, %norm_l {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %q = dsv3.matmul %xn, %wq_l : (tensor<?x?x16xf32>, tensor<16x16xf32>) -> tensor<?x?x16xf32>
      %qh = dsv3.split_heads %q {heads = 2 : i64} : (tensor<?x?x16xf32>) -> tensor<?x?x2x8xf32>
      %q_nope = dsv3.slice %qh {start = 0 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %q_rot = dsv3.slice %qh {start = 4 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %q_pe = dsv3.rope %q_rot, %pos {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x2x4xf32>, tensor<?x?xi32>) -> tensor<?x?x2x4xf32>
      %k_rot = dsv3.slice %xn {start = 0 : i64, size = 4 : i64} : (tensor<?x?x16xf32>) -> tensor<?x?x4xf32>
      %k_pe = dsv3.rope %k_rot, %pos {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x4xf32>, tensor<?x?xi32>) -> tensor<?x?x4xf32>
      %att = dsv3.attention %q_nope, %q_pe, %q_nope, %k_pe, %q_nope {scale = 5.000000e-01 : f64} : (tensor<?x?x2x4xf32>, tensor<?x?x2x4xf32>, tensor<?x?x2x4xf32>, tensor<?x?x4xf32>, tensor<?x?x2x4xf32>) -> tensor<?x?x2x4xf32>
      %merged = dsv3.merge_heads %att : (tensor<?x?x2x4xf32>) -> tensor<?x?x8xf32>
      %proj = dsv3.matmul %merged, %wo_l : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %h1 = dsv3.add %hl, %proj : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      %weights, %experts, %scores = dsv3.router %h1, %router_l, %bias_l {score = #dsv3<score sigmoid>, top_k = 2 : i64, groups = 2 : i64, keep_groups = 1 : i64, scale = 1.000000e+00 : f64, normalize = true} : (tensor<?x?x16xf32>, tensor<16x4xf32>, tensor<4xf32>) -> (tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<?x?x4xf32>)
      %routed = dsv3.experts %h1, %weights, %experts, %gate_l, %up_l, %down_l : (tensor<?x?x16xf32>, tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<4x16x8xf32>, tensor<4x16x8xf32>, tensor<4x8x16xf32>) -> tensor<?x?x16xf32>
      %balance = dsv3.balance_loss %scores, %experts {alpha = 1.000000e-04 : f64} : (tensor<?x?x4xf32>, tensor<?x?x2xi32>) -> tensor<f32>
      %layer_load = dsv3.expert_load %experts {experts = 4 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>
      %next = dsv3.add %h1, %routed : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %next, %balance, %layer_load : tensor<?x?x16xf32>, tensor<f32>, tensor<4xf32>
    }
    %balance_total = dsv3.sum %aux : (tensor<2xf32>) -> tensor<f32>
    dsv3.output %balance_total {name = "balance_loss", role = #dsv3<role aux_loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    dsv3.output %load {name = "expert_load", role = #dsv3<role metric>} : tensor<2x4xf32>
    dsv3.bias_update %load {param = "moe.router_bias", rate = 1.000000e-02 : f64} : tensor<2x4xf32>
    %final_norm = dsv3.param {name = "final_norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %hn = dsv3.rms_norm %h, %final_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
    %head = dsv3.transpose %table : (tensor<32x16xf32>) -> tensor<16x32xf32>
    %logits = dsv3.matmul %hn, %head : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x32xf32>
    %labels, %label_mask = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %lm_loss = dsv3.cross_entropy %logits, %labels, %label_mask : (tensor<?x?x32xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %lm_loss {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    func.return
  }
}
"""  # noqa: E501 (IR is printed one op a line)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"not exactly one {old!r}"
    return text.replace(old, new)


def _position_of_line(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column of the first non-blank character) of the one line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {[i + 1 for i in hits]}"
    line = text.splitlines()[hits[0]]
    return hits[0] + 1, len(line) - len(line.lstrip()) + 1


def _tokens(seed: int = 0) -> jax.Array:
    """A [B, S+1] token batch (inputs and shifted labels), as `run_model` and `train_step` read it."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (BATCH, SEQ + 1)), jnp.int32)


def _params(infos: dict[str, ParamInfo], seed: int = 0) -> dict[str, jax.Array]:
    """Parameters as the IR declares them (normal with its std, zeros, ones), drawn with numpy: a jitted
    `init_params` spends seconds compiling one RNG kernel per parameter, which these tests do not need."""
    rng = np.random.default_rng(seed)
    fill = {"zeros": np.zeros, "ones": np.ones}
    return {
        name: jnp.asarray(
            fill[i.init](i.shape) if i.init in fill else rng.normal(0.0, i.std, i.shape), dtype=i.dtype
        )
        for name, i in infos.items()
    }


def _run(module, params: dict[str, jax.Array], tokens: jax.Array):
    return jax.jit(lambda p, t: run_model(module, p, t))(params, tokens)


def _first_router_stack(text: str) -> tuple[int, int]:
    """Line indices (0-based) of the first router and of the yield ending its layer, in the main MoE stack."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "dsv3.router" in line)
    end = next(i for i in range(start, len(lines)) if "dsv3.yield" in lines[i])
    first_mtp = next(i for i, line in enumerate(lines) if '{name = "mtp.' in line)
    assert end < first_mtp, "the first router must be the main model's, before any MTP op"
    return start, end


def _set_top_k(text: str, k: int) -> str:
    """Changes the main MoE stack's router to top-k: the property and the [B,S,k] types of its results and users."""
    lines = text.splitlines(keepends=True)
    start, end = _first_router_stack(text)
    assert f"top_k = {TOP_K} : i64" in lines[start]
    edited = list(lines)
    for i in range(start, end + 1):
        edited[i] = (
            lines[i].replace(f"top_k = {TOP_K} : i64", f"top_k = {k} : i64")
            .replace(f"tensor<?x?x{TOP_K}xf32>", f"tensor<?x?x{k}xf32>")
            .replace(f"tensor<?x?x{TOP_K}xi32>", f"tensor<?x?x{k}xi32>")
        )
    changed = [edited[i].split("=", 1)[1].split()[0] for i in range(start, end + 1) if edited[i] != lines[i]]
    assert changed == ["dsv3.router", "dsv3.experts", "dsv3.balance_loss", "dsv3.expert_load"], changed
    return "".join(edited)


def _delete_mtp(text: str) -> str:
    """Deletes the MTP module by hand: every line from its first parameter to the function's return."""
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if '{name = "mtp.' in line)
    ret = max(i for i, line in enumerate(lines) if "func.return" in line)
    assert all("dsv3.output" not in line or '"mtp_' in line for line in lines[first:ret])
    return "".join(lines[:first] + lines[ret:])


# --------------------------------------------------------------------------------------------------------------------
# Shared compiles


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "small.dsv3"
    path.write_text(SMALL_SPEC)
    return path


@pytest.fixture(scope="module")
def dumped(spec_path, tmp_path_factory) -> tuple[Path, dict]:
    """`dsv3c compile small.dsv3 --mode forward --dump-ir DIR --report R` (one XLA compile): the dump folder and
    the report."""
    out = tmp_path_factory.mktemp("dump")
    report = tmp_path_factory.mktemp("report") / "report.json"
    argv = ["compile", str(spec_path), "--mode", "forward", "--batch", str(BATCH), "--seq", str(SEQ),
            "--dump-ir", str(out), "--report", str(report)]
    assert main(argv) == 0
    return out, json.loads(report.read_text())


@pytest.fixture(scope="module")
def input_text(dumped) -> str:
    return (dumped[0] / "00-input.mlir").read_text()


@pytest.fixture(scope="module")
def input_prog(dumped) -> dsv3c.Program:
    """The dumped `00-input.mlir` compiled again, as a `.mlir` input, in forward mode (one XLA compile)."""
    return dsv3c.compile(dumped[0] / "00-input.mlir", mode="forward", batch=BATCH, seq=SEQ)


# --------------------------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("example", ["tiny", "deepseek3-test", "deepseek-v3-671b"])
def test_print_parse_round_trip_is_exact(example: str) -> None:
    text = print_ir(dsv3c.build_ir(dsv3c.load(EXAMPLES / f"{example}.dsv3")))
    module = parse_ir(text, f"{example}.mlir")
    assert print_ir(module) == text
    assert print_ir(parse_ir(print_ir(module))) == text


def test_base_ir_is_valid_prints_back_and_runs() -> None:
    module = parse_ir(BASE_IR, "base.mlir")
    assert print_ir(module) == BASE_IR
    out = _run(module, _params(param_infos(module)), _tokens() % 32)
    assert out.metrics["logits"].shape == (BATCH, SEQ, 32)
    # top-2 of 4 experts for 16 tokens, in each of the 2 layers
    np.testing.assert_array_equal(np.asarray(out.metrics["expert_load"]).sum(axis=-1), [BATCH * SEQ * 2] * 2)


# --------------------------------------------------------------------------------------------------------------------
# Verifiers: each case breaks BASE_IR in one place; the error names the op and points at it.


@dataclass(frozen=True)
class Broken:
    edits: tuple[tuple[str, str], ...]  # (old, new), each `old` unique in BASE_IR
    at: str  # unique text on the offending op's line, after the edits
    message: str  # the complete message, op name included


ROUTER_PROPS = 'top_k = 2 : i64, groups = 2 : i64, keep_groups = 1 : i64'
BROKEN = {
    "matmul-contracting-dims": Broken(
        (("%q = dsv3.matmul %xn, %wq_l : (tensor<?x?x16xf32>, tensor<16x16xf32>)",
          "%q = dsv3.matmul %xn, %wo_l : (tensor<?x?x16xf32>, tensor<8x16xf32>)"),),
        "%q = dsv3.matmul", "'dsv3.matmul' op contracts ?x?x16 with 8x16: 16 != 8",
    ),
    "rms-norm-weight-width": Broken(
        (('{name = "final_norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>',
          '{name = "final_norm", axes = ["embed"], init = "ones", trainable = true} : tensor<8xf32>'),
         ("(tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>\n    %head",
          "(tensor<?x?x16xf32>, tensor<8xf32>) -> tensor<?x?x16xf32>\n    %head")),
        "%hn = dsv3.rms_norm", "'dsv3.rms_norm' op weight must have shape 16, got 8",
    ),
    "rms-norm-eps": Broken(
        (("%xn = dsv3.rms_norm %hl, %norm_l {eps = 1.000000e-06 : f64}",
          "%xn = dsv3.rms_norm %hl, %norm_l {eps = 0.000000e+00 : f64}"),),
        "%xn = dsv3.rms_norm", "'dsv3.rms_norm' op eps must be finite and positive, got 0",
    ),
    "router-top-k-over-experts": Broken(
        ((ROUTER_PROPS, ROUTER_PROPS.replace("top_k = 2", "top_k = 5")),),
        "dsv3.router", "'dsv3.router' op top_k = 5 must be in [1, 4]",
    ),
    "router-top-k-over-kept-experts": Broken(
        ((ROUTER_PROPS, ROUTER_PROPS.replace("top_k = 2", "top_k = 3")),),
        "dsv3.router", "'dsv3.router' op top_k = 3 exceeds the 2 kept experts",
    ),
    "router-groups-not-dividing-experts": Broken(
        ((ROUTER_PROPS, ROUTER_PROPS.replace("groups = 2", "groups = 3")),),
        "dsv3.router", "'dsv3.router' op groups = 3 must divide 4 experts",
    ),
    "router-keep-groups-over-groups": Broken(
        ((ROUTER_PROPS, ROUTER_PROPS.replace("keep_groups = 1", "keep_groups = 3")),),
        "dsv3.router", "'dsv3.router' op keep_groups = 3 must be in [1, groups = 2]",
    ),
    "expert-load-width": Broken(
        (("{experts = 4 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>",
          "{experts = 5 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>"),),
        "dsv3.expert_load", "'dsv3.expert_load' op result must have one entry per expert",
    ),
    "layer-stack-count-vs-stacked-operand": Broken(
        (('{count = 2 : i64, kind = "moe"}', '{count = 3 : i64, kind = "moe"}'),),
        "dsv3.layer_stack",
        "'dsv3.layer_stack' op operand 1 (2x16) must be stacked along a leading axis of size count = 3",
    ),
    "yield-type-vs-stack-result": Broken(
        (("dsv3.yield %next, %balance, %layer_load : tensor<?x?x16xf32>, tensor<f32>, tensor<4xf32>",
          "dsv3.yield %next, %layer_load, %balance : tensor<?x?x16xf32>, tensor<4xf32>, tensor<f32>"),),
        "dsv3.layer_stack", "'dsv3.layer_stack' op result 1 must stack the yielded 4 to 2x4",
    ),
    "yield-count-vs-stack-results": Broken(
        (("dsv3.yield %next, %balance, %layer_load : tensor<?x?x16xf32>, tensor<f32>, tensor<4xf32>",
          "dsv3.yield %next, %balance : tensor<?x?x16xf32>, tensor<f32>"),),
        "dsv3.layer_stack", "'dsv3.layer_stack' op yields 2 values for 3 results",
    ),
    "param-axes-vs-rank": Broken(
        (('{name = "embed", axes = ["vocab", "embed"]', '{name = "embed", axes = ["vocab"]'),),
        '{name = "embed"', "'dsv3.param' op 'embed': 1 axis names for a rank-2 tensor",
    ),
    "param-dynamic-shape": Broken(
        (("    %final_norm = ",
          '    %extra = dsv3.param {name = "extra", axes = ["embed"], init = "ones", trainable = true} '
          ": tensor<?xf32>\n    %final_norm = "),),
        '{name = "extra"', "'dsv3.param' op 'extra': a parameter needs a static shape, got ?",
    ),
    "param-unknown-init": Broken(
        (('{name = "final_norm", axes = ["embed"], init = "ones"',
          '{name = "final_norm", axes = ["embed"], init = "one"'),),
        '{name = "final_norm"', "'dsv3.param' op 'final_norm': init must be one of normal, zeros, ones",
    ),
    "slice-out-of-range": Broken(
        (("%q_rot = dsv3.slice %qh {start = 4 : i64", "%q_rot = dsv3.slice %qh {start = 6 : i64"),),
        "%q_rot = dsv3.slice", "'dsv3.slice' op [6:10] is outside 8",
    ),
    "split-heads-not-dividing": Broken(
        (("dsv3.split_heads %q {heads = 2 : i64}", "dsv3.split_heads %q {heads = 3 : i64}"),),
        "dsv3.split_heads", "'dsv3.split_heads' op width 16 does not split into 3 heads",
    ),
    "bias-update-of-another-stack": Broken(
        (('    dsv3.bias_update %load {param = "moe.router_bias"',
          '    %other = dsv3.param {name = "other_bias", axes = ["layers", "exp"], init = "zeros", trainable = false} '
          ': tensor<2x4xf32>\n    dsv3.bias_update %load {param = "other_bias"'),),
        "dsv3.bias_update", "updates 'other_bias', which the layer stack that computes the load does not read",
    ),
    "loss-output-not-scalar": Broken(
        (('{name = "expert_load", role = #dsv3<role metric>}',
          '{name = "expert_load", role = #dsv3<role aux_loss>, weight = 1.0 : f64}'),),
        '{name = "expert_load"', "'dsv3.output' op loss term 'expert_load' must be a scalar",
    ),
    "loss-output-without-weight": Broken(
        (('{name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64}',
          '{name = "lm_loss", role = #dsv3<role loss>}'),),
        '{name = "lm_loss"', "'dsv3.output' op 'lm_loss': a loss output is a loss term and needs a weight",
    ),
    "weight-on-a-non-loss-role": Broken(
        (('{name = "logits", role = #dsv3<role logits>}',
          '{name = "logits", role = #dsv3<role logits>, weight = 1.0 : f64}'),),
        '{name = "logits"', "'dsv3.output' op 'logits': only loss roles take a weight, not logits",
    ),
    "output-without-role": Broken(
        (('{name = "logits", role = #dsv3<role logits>}', '{name = "logits"}'),),
        '{name = "logits"', "property 'role' expected in operation 'dsv3.output'",
    ),
    "second-loss-output": Broken(
        (('{name = "balance_loss", role = #dsv3<role aux_loss>', '{name = "balance_loss", role = #dsv3<role loss>'),),
        '{name = "lm_loss"', "'lm_loss' is a second loss output of @model (the first is 'balance_loss')",
    ),
    "ema-decay-of-one": Broken(
        (("min_lr_ratio = 1.000000e+00 : f64}", "min_lr_ratio = 1.000000e+00 : f64, ema_decay = 1.0 : f64}"),),
        "dsv3.optimizer", "'dsv3.optimizer' op ema_decay must be finite and in [0, 1), got 1",
    ),
    "second-logits-output": Broken(
        (('{name = "expert_load", role = #dsv3<role metric>}', '{name = "expert_load", role = #dsv3<role logits>}'),),
        '{name = "logits"', "'logits' is a second logits output of @model (the first is 'expert_load')",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_verifier_rejects_hand_broken_ir_at_the_op(case: str) -> None:
    broken = BROKEN[case]
    text = BASE_IR
    for old, new in broken.edits:
        text = _replace_once(text, old, new)
    line, col = _position_of_line(text, broken.at)
    with pytest.raises(dsv3c.SpecError) as info:
        parse_ir(text, "x.mlir")
    err = info.value
    assert (err.path, err.line, err.col, err.message) == ("x.mlir", line, col, broken.message)
    assert str(err) == f"x.mlir:{line}:{col}: error: {broken.message}"


UNKNOWN_CHOICES = {
    "output-role": ("#dsv3<role metric>", "metrics",
                    "Expected `loss`, `mtp_loss`, `aux_loss`, `metric`, `logits`, or `hidden`."),
    "router-score": ("#dsv3<score sigmoid>", "relu", "Expected `sigmoid`, or `softmax`."),
    "rope-layout": ("#dsv3<rope_layout half>", "rotate_half", "Expected `interleaved`, or `half`."),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN_CHOICES))
def test_unknown_enum_value_is_a_parse_error_at_the_word(case: str) -> None:
    """A choice outside its enum is refused by the parser, pointing at the word, with the words it accepts."""
    attr, word, message = UNKNOWN_CHOICES[case]
    bad = attr.rsplit(" ", 1)[0] + f" {word}>"
    text = BASE_IR.replace(attr, bad, 1)
    line, _ = _position_of_line(text, bad)
    with pytest.raises(dsv3c.SpecError) as info:
        parse_ir(text, "x.mlir")
    err = info.value
    assert (err.line, err.message) == (line, message)
    assert text.splitlines()[line - 1][err.col - 1:].startswith(word)


def test_unknown_op_is_a_positioned_parse_error() -> None:
    text = _replace_once(BASE_IR, "%next = dsv3.add", "%next = dsv3.addd")
    line, col = _position_of_line(text, "dsv3.addd")
    with pytest.raises(dsv3c.SpecError) as info:
        parse_ir(text, "x.mlir")
    err = info.value
    assert err.line == line and "dsv3.addd" in err.message and "not registered" in err.message
    # xDSL reports the error once the name is read, so the column is within the op's own text (at its first operand).
    op_line = text.splitlines()[line - 1]
    assert col <= err.col <= op_line.index("dsv3.addd") + len("dsv3.addd") + 2


def test_operand_type_mismatch_is_a_positioned_parse_error() -> None:
    text = _replace_once(BASE_IR, "%logits = dsv3.matmul %hn, %head : (tensor<?x?x16xf32>, tensor<16x32xf32>)",
                         "%logits = dsv3.matmul %hn, %head : (tensor<?x?x16xf32>, tensor<8x32xf32>)")
    line, _ = _position_of_line(text, "%logits = dsv3.matmul")
    with pytest.raises(dsv3c.SpecError) as info:
        parse_ir(text, "x.mlir")
    assert info.value.line == line and "tensor<8x32xf32>" in info.value.message


@pytest.mark.parametrize("cut", ["top_k = 2", "%routed = dsv3.experts", "func.return"])
def test_truncated_file_is_a_parse_error_at_its_end(cut: str) -> None:
    text = BASE_IR[: BASE_IR.index(cut)]
    with pytest.raises(dsv3c.SpecError) as info:
        parse_ir(text, "x.mlir")
    end_of_text = (text.count("\n") + 1, len(text.split("\n")[-1]) + 1)
    assert (info.value.path, info.value.line, info.value.col) == ("x.mlir", *end_of_text)
    assert info.value.message.strip()


# --------------------------------------------------------------------------------------------------------------------
# The command line on malformed IR


def _broken_file(tmp_path: Path) -> tuple[Path, int, int]:
    text = _replace_once(BASE_IR, ROUTER_PROPS, ROUTER_PROPS.replace("groups = 2", "groups = 3"))
    path = tmp_path / "bad.mlir"
    path.write_text(text)
    return (path, *_position_of_line(text, "dsv3.router"))


@pytest.mark.parametrize("command", ["compile", "opt"])
def test_cli_on_malformed_ir_exits_2_with_position(command: str, tmp_path, capsys) -> None:
    path, line, col = _broken_file(tmp_path)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}:{col}: error: 'dsv3.router' op groups = 3 must divide 4 experts" in err.splitlines()
    assert "Traceback" not in err


def test_cli_on_truncated_ir_exits_2_with_position(tmp_path, capsys) -> None:
    path = tmp_path / "cut.mlir"
    path.write_text(BASE_IR[: BASE_IR.index("%routed")])
    assert main(["compile", str(path)]) == 2
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: error: .+\n", capsys.readouterr().err)


def test_cli_process_exit_code_and_no_traceback(tmp_path) -> None:
    path, line, col = _broken_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "dsv3c", "compile", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    # The message is the last line (JAX's import may log to stderr before it, e.g. a CUDA plugin on a CPU host).
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{path}:{line}:{col}: error: 'dsv3.router' op"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------------------------------------------------
# dsv3c opt


def test_opt_drop_mtp_prints_between_passes(dumped, input_text, tmp_path, capsys) -> None:
    path = tmp_path / "in.mlir"
    path.write_text(input_text)
    assert main(["opt", str(path), "-p", "dsv3-drop-mtp,dsv3-dce", "--print-between-passes"]) == 0
    out = capsys.readouterr().out
    chunks = re.split(r"^// -----// IR after (\S+) //----- //\n", out, flags=re.M)
    assert chunks[0] == "" and chunks[1::2] == ["dsv3-drop-mtp", "dsv3-dce"]
    after_drop, after_dce = (chunk.rstrip("\n") + "\n" for chunk in chunks[2::2])
    # The pass's output is what `compile --mode forward` dumped after it; DCE finds nothing more to remove.
    assert after_drop == (dumped[0] / "01-dsv3-drop-mtp.mlir").read_text()
    assert after_dce == after_drop
    assert '"mtp.' not in after_drop and '"mtp_' not in after_drop
    assert print_ir(parse_ir(after_drop)) == after_drop

    assert main(["opt", str(path), "-p", "dsv3-drop-mtp"]) == 0
    assert capsys.readouterr().out == after_drop


def test_opt_without_mtp_or_dead_code_changes_nothing(tmp_path, capsys) -> None:
    path = tmp_path / "base.mlir"
    path.write_text(BASE_IR)
    assert main(["opt", str(path), "-p", "dsv3-drop-mtp,dsv3-dce"]) == 0
    assert capsys.readouterr().out == BASE_IR


@pytest.mark.parametrize("command", ["opt", "compile"])
def test_unknown_pass_lists_the_known_ones(command: str, tmp_path, capsys) -> None:
    path = tmp_path / "base.mlir"
    path.write_text(BASE_IR)
    assert main([command, str(path), "-p", "dsv3-drop-mtp,dsv3-no-such-pass"]) == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith("dsv3c: error: ") and "dsv3-no-such-pass" in message and "Traceback" not in err
    assert "known passes: dsv3-dce, dsv3-drop-mtp" in message


# --------------------------------------------------------------------------------------------------------------------
# --dump-ir


def test_dump_ir_writes_every_stage_in_order(dumped, spec_path, input_text) -> None:
    out, report = dumped
    assert sorted(p.name for p in out.iterdir()) == [
        "00-input.mlir", "01-dsv3-drop-mtp.mlir", "02-dsv3-kernels.mlir", "03-stablehlo.mlir", "04-compiled.hlo.txt",
    ]  # the target's kernel choice always comes last
    assert input_text == print_ir(dsv3c.build_ir(dsv3c.load(spec_path)))
    assert '"mtp.' in input_text and '"mtp.' not in (out / "01-dsv3-drop-mtp.mlir").read_text()
    stablehlo = (out / "03-stablehlo.mlir").read_text()
    assert stablehlo.lstrip().startswith("module @") and "stablehlo." in stablehlo
    assert "HloModule" in (out / "04-compiled.hlo.txt").read_text()
    assert report["mode"] == "forward" and report["pipeline"].startswith("dsv3-drop-mtp,dsv3-kernels{")
    assert report["params_mtp"] == 0


def test_dumped_input_compiles_to_the_same_program(dumped, input_prog) -> None:
    out, report = dumped
    assert input_prog.stablehlo == (out / "03-stablehlo.mlir").read_text()
    for key in ("params_total", "params_active_per_token", "params_mtp", "vocab", "pipeline"):
        assert input_prog.report[key] == report[key], key
    stages = ["input", "dsv3-drop-mtp", "dsv3-kernels", "stablehlo", "compiled"]
    assert [stage for stage, _ in input_prog.dumps] == stages


# --------------------------------------------------------------------------------------------------------------------
# Hand edits change the program


def test_editing_router_top_k_changes_routing(input_text, input_prog, tmp_path) -> None:
    new_k = 3
    edited = tmp_path / "top3.mlir"
    edited.write_text(_set_top_k(input_text, new_k))
    prog = dsv3c.compile(edited, mode="forward", batch=BATCH, seq=SEQ)

    params, tokens = _params(input_prog.infos), _tokens()
    before, after = _run(input_prog.module, params, tokens), _run(prog.module, params, tokens)
    tokens_per_layer = BATCH * SEQ
    load_before = np.asarray(before.metrics["expert_load"])
    load_after = np.asarray(after.metrics["expert_load"])
    assert load_before.shape == load_after.shape == (MOE_LAYERS, EXPERTS)
    np.testing.assert_array_equal(load_before.sum(axis=-1), [tokens_per_layer * TOP_K] * MOE_LAYERS)
    np.testing.assert_array_equal(load_after.sum(axis=-1), [tokens_per_layer * new_k] * MOE_LAYERS)
    logits_before, logits_after = np.asarray(before.metrics["logits"]), np.asarray(after.metrics["logits"])
    assert np.abs(logits_after - logits_before).max() > 1e-3 * np.abs(logits_before).max()

    # The report reads the new top_k off the IR: each token now uses one more routed expert in each MoE layer.
    routed = sum(math.prod(i.shape) for i in input_prog.infos.values() if i.name.startswith("moe.experts_"))
    assert prog.report["params_total"] == input_prog.report["params_total"]
    extra = prog.report["params_active_per_token"] - input_prog.report["params_active_per_token"]
    assert extra == pytest.approx(routed * (new_k - TOP_K) / EXPERTS, abs=2)


def test_deleting_mtp_by_hand_matches_the_pass_and_keeps_the_model(input_text, tmp_path) -> None:
    hand = _delete_mtp(input_text)
    module = parse_ir(input_text)
    run_pipeline(module, "dsv3-drop-mtp")
    assert print_ir(module) == hand

    path = tmp_path / "no_mtp.mlir"
    path.write_text(hand)
    prog = dsv3c.prepare(path, mode="train", batch=BATCH, seq=SEQ)
    full = parse_ir(input_text)
    assert count_params(full)["mtp_total"] > 0
    counts = count_params(prog.module)
    assert counts["mtp_total"] == 0 and counts["mtp_active"] == 0
    assert counts["total"] == count_params(full)["total"]

    # The same parameters give the same logits and language-model loss with and without the MTP module.
    state = prog.init_state(0)
    params = {**state["params"], **state["router_bias"]}
    assert set(params) == set(prog.infos)
    full_infos = param_infos(full)
    mtp_params = _params({k: v for k, v in full_infos.items() if k.startswith("mtp.")}, seed=1)
    full_params = {**params, **mtp_params}
    assert set(full_params) == set(full_infos)
    tokens = _tokens(1)
    reference = _run(full, full_params, tokens)
    assert float(reference.metrics["mtp_loss"]) > 0
    np.testing.assert_allclose(
        np.asarray(prog.forward(params, tokens[:, :-1])), np.asarray(reference.metrics["logits"]), rtol=1e-5,
        atol=1e-5,
    )
    lm_loss_with_mtp = float(reference.metrics["lm_loss"])

    metrics = prog.eval_step(state, {"tokens": tokens})  # the training losses, without the backward pass
    assert float(metrics.get("mtp_loss", 0.0)) == 0.0
    np.testing.assert_allclose(float(metrics["lm_loss"]), lm_loss_with_mtp, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["lm_loss"] + metrics["balance_loss"]), rtol=1e-6)
    # With MTP the loss had two more weighted terms.
    with_mtp = (reference.metrics["lm_loss"] + 0.3 * reference.metrics["mtp_loss"] + reference.metrics["balance_loss"]
                + reference.metrics["mtp_balance_loss"])
    np.testing.assert_allclose(float(reference.loss), float(with_mtp), rtol=1e-5)
    assert float(reference.loss) > float(metrics["loss"])


def test_mtp_is_found_by_structure_not_by_name(input_text) -> None:
    """With every `mtp` in names replaced, dsv3-drop-mtp removes the same ops and the report counts the same MTP
    parameters: the `mtp_loss` role and the data flow decide, not name prefixes."""
    renamed = input_text.replace("mtp", "draft").replace("<role draft_loss>", "<role mtp_loss>")
    assert "mtp" not in renamed.replace("<role mtp_loss>", "")
    module = parse_ir(renamed)
    assert count_params(module) == count_params(parse_ir(input_text))
    run_pipeline(module, "dsv3-drop-mtp")
    assert print_ir(module) == _delete_mtp(input_text)


def test_edit_that_breaks_verification_is_reported_at_the_op(input_text, tmp_path, capsys) -> None:
    # Only the property, not the result types: the router's verifier sees [B,S,2] results for top_k = 3.
    start, _ = _first_router_stack(input_text)
    lines = input_text.splitlines(keepends=True)
    lines[start] = lines[start].replace(f"top_k = {TOP_K} : i64", "top_k = 3 : i64")
    path = tmp_path / "half_edit.mlir"
    path.write_text("".join(lines))
    col = len(lines[start]) - len(lines[start].lstrip()) + 1
    argv = ["compile", str(path), "--mode", "forward", "--batch", str(BATCH), "--seq", str(SEQ)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}:{start + 1}:{col}: error: 'dsv3.router' op result ?x?x2 must end in 3 (top_k)" in err.splitlines()


# --------------------------------------------------------------------------------------------------------------------
# Depth independence: repeated layers stay one op and lower to one loop


def _deep_spec(layers: int) -> dsv3c.ModelSpec:
    return dsv3c.parse(SMALL_SPEC.replace("layers 3 {", f"layers {layers} {{"), filename=f"small{layers}.dsv3")


def test_ir_and_stablehlo_do_not_grow_with_depth() -> None:
    texts, ops, hlos = {}, {}, {}
    for layers in (8, 61):
        module = dsv3c.build_ir(_deep_spec(layers))
        texts[layers] = print_ir(module)
        ops[layers] = [op.name for op in module.walk()]
        prog = dsv3c.Program(module, resolve_target("cpu"), jax.devices()[:1], "forward", BATCH, SEQ, 1)
        hlos[layers] = prog.lower().as_text()
    assert ops[8] == ops[61] and len(ops[8]) > 50

    # Only the stacked layers' count and leading dimensions differ (7 vs 60 MoE layers after one dense layer).
    def normalised(text: str, moe: int) -> str:
        return text.replace(f"count = {moe} : i64", "count = L : i64").replace(f"tensor<{moe}x", "tensor<Lx")

    assert "tensor<7x" in texts[8] and "tensor<60x" in texts[61]
    assert normalised(texts[8], 7) == normalised(texts[61], 60)

    whiles = {n: h.count("stablehlo.while") for n, h in hlos.items()}
    assert whiles[8] == whiles[61] >= 2
    assert abs(len(hlos[61]) - len(hlos[8])) <= 0.02 * len(hlos[8])
