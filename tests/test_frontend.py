"""The `.dsv3` front end: the examples parse to the right spec, and every malformed spec is a `SpecError` that points
at the offending line and column with a message naming the cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv3c.frontend import SpecError, load, parse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A small valid spec that the malformed cases below each break in one place. Line numbers matter to the cases.
BASE = """\
model t {
  vocab 256
  dim 64
  layers 4 { dense_first 1 }
  attention mla {
    heads 4
    q_lora_rank 32
    kv_lora_rank 32
    head_dim { nope 16, rope 8, v 16 }
    rope { theta 10000, yarn { factor 4, original_len 128 } }
  }
  ffn dense { hidden 128 }
  ffn moe {
    experts 8 { top_k 2, hidden 32 }
    routing sigmoid { groups 2, keep_groups 1 }
  }
  norm rms { eps 1e-6 }
}
train {
  optimizer adamw { lr 1e-3, betas 0.9 0.95 }
}
"""

MOE_BLOCK = """\
  ffn moe {
    experts 8 { top_k 2, hidden 32 }
    routing sigmoid { groups 2, keep_groups 1 }
  }
"""


def _broken(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def test_base_is_valid() -> None:
    spec = parse(BASE)
    assert spec.moe is not None and spec.moe.top_k == 2
    assert spec.attention.rope.yarn is not None and spec.attention.rope.yarn.original_len == 128


# --------------------------------------------------------------------------------------------------------------------
# The examples


def test_deepseek_v3_671b() -> None:
    spec = load(EXAMPLES / "deepseek-v3-671b.dsv3")
    assert (spec.name, spec.vocab, spec.dim, spec.layers, spec.dense_first) == ("deepseek_v3", 129280, 7168, 61, 3)
    att = spec.attention
    assert (att.heads, att.q_lora_rank, att.kv_lora_rank) == (128, 1536, 512)
    assert (att.nope_dim, att.rope_dim, att.v_dim) == (128, 64, 128)
    assert att.rope.layout == "interleaved" and att.rope.theta == 10000.0
    assert att.rope.yarn is not None
    assert (att.rope.yarn.factor, att.rope.yarn.original_len, att.rope.yarn.beta_fast) == (40.0, 4096, 32.0)
    assert spec.dense_ffn is not None and spec.dense_ffn.hidden == 18432
    moe = spec.moe
    assert moe is not None
    assert (moe.experts, moe.top_k, moe.shared, moe.hidden) == (256, 8, 1, 2048)
    assert (moe.score, moe.groups, moe.keep_groups, moe.scale) == ("sigmoid", 8, 4, 2.5)
    assert moe.normalize and moe.router_bias and (moe.bias_rate, moe.seq_aux) == (0.001, 0.0001)
    assert (spec.mtp.depth, spec.mtp.weight) == (1, 0.3)
    assert not spec.tied_head and spec.norm_eps == 1e-6
    assert (spec.init.std, spec.init.mla_std, spec.grad_mask_threshold) == (0.006, 0.001, 100.0)
    assert (spec.dtypes.params, spec.dtypes.compute) == ("f32", "bf16")
    opt = spec.optimizer
    assert (opt.kind, opt.lr, opt.b1, opt.b2, opt.eps) == ("adamw", 2.2e-4, 0.9, 0.95, 1e-8)
    assert (opt.weight_decay, opt.clip, opt.moments) == (0.1, 1.0, "bf16")
    assert (opt.schedule, opt.warmup, opt.decay_steps, opt.min_lr_ratio) == ("cosine", 2000, 0, 0.1)
    assert (spec.dense_layers, spec.moe_layers) == (3, 58)


def test_deepseek3_test() -> None:
    spec = load(EXAMPLES / "deepseek3-test.dsv3")
    assert (spec.vocab, spec.dim, spec.layers, spec.dense_first) == (129280, 512, 61, 3)
    att = spec.attention
    assert (att.heads, att.q_lora_rank, att.kv_lora_rank) == (128, 1536, 512)
    assert (att.nope_dim, att.rope_dim, att.v_dim) == (128, 64, 128)
    assert att.rope.yarn is not None and (att.rope.yarn.factor, att.rope.yarn.original_len) == (40.0, 4096)
    assert (att.rope.yarn.beta_fast, att.rope.yarn.beta_slow) == (32.0, 1.0)
    assert spec.dense_ffn is not None and spec.dense_ffn.hidden == 18432
    moe = spec.moe
    assert moe is not None
    assert (moe.experts, moe.top_k, moe.shared, moe.hidden, moe.scale) == (256, 8, 1, 512, 2.5)
    assert (moe.groups, moe.keep_groups, moe.router_bias, moe.bias_rate) == (1, 1, True, 0.0)
    assert spec.mtp.depth == 0 and not spec.tied_head and spec.norm_eps == 1e-6
    assert (spec.dtypes.params, spec.dtypes.compute) == ("f32", "bf16")


def test_tiny() -> None:
    spec = load(EXAMPLES / "tiny.dsv3")
    assert (spec.vocab, spec.dim, spec.layers, spec.dense_first) == (256, 64, 4, 1)
    att = spec.attention
    assert (att.heads, att.q_lora_rank, att.kv_lora_rank) == (4, 32, 32)
    assert (att.nope_dim, att.rope_dim, att.v_dim) == (16, 8, 16)
    assert att.rope.layout == "half" and att.rope.yarn is None
    moe = spec.moe
    assert moe is not None
    assert (moe.experts, moe.top_k, moe.shared, moe.hidden, moe.groups, moe.keep_groups) == (8, 2, 1, 32, 2, 2)
    assert (moe.bias_rate, moe.seq_aux, moe.scale) == (0.01, 0.0001, 1.0)
    assert (spec.mtp.depth, spec.init.std, spec.dtypes.compute) == (1, 0.02, "f32")
    opt = spec.optimizer
    assert (opt.lr, opt.b1, opt.b2, opt.weight_decay, opt.moments, opt.warmup) == (1e-2, 0.9, 0.95, 0.0, "f32", 10)
    assert opt.eps == 1e-8  # not written: the dataclass default


def test_positions_are_recorded() -> None:
    spec = load(EXAMPLES / "deepseek-v3-671b.dsv3")
    assert spec.positions["model"] == (3, 1)
    assert spec.positions["model.vocab"] == (4, 3)
    assert spec.positions["model.dense_first"] == (6, 15)
    assert spec.positions["model.attention"] == (8, 3)
    assert spec.positions["model.attention.heads"] == (9, 5)
    assert spec.positions["model.attention.rope_dim"] == (12, 26)
    assert spec.positions["model.attention.rope.yarn.factor"] == (13, 52)
    assert spec.positions["model.moe"] == (16, 3)
    assert spec.positions["model.moe.top_k"] == (17, 19)
    assert spec.positions["model.optimizer.lr"] == (28, 21)
    assert "model.moe.experts" in spec.positions and "model.optimizer.b2" in spec.positions


# --------------------------------------------------------------------------------------------------------------------
# Valid variations


def test_string_input_is_named_string() -> None:
    assert parse(BASE).path == "<string>"
    with pytest.raises(SpecError) as err:
        parse("model {")
    assert str(err.value).startswith("<string>:1:7: error:")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.dsv3"
    path.write_text(BASE.replace("dim 64", "dim -1"))
    with pytest.raises(SpecError) as err:
        load(path)
    assert (err.value.path, err.value.line, err.value.col) == (str(path), 3, 7)
    assert str(err.value).startswith(f"{path}:3:7: error: 'dim' must be positive")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load(tmp_path / "absent.dsv3")


def test_no_moe_makes_every_layer_dense() -> None:
    spec = parse(BASE.replace(MOE_BLOCK, "").replace("layers 4 { dense_first 1 }", "layers 4"))
    assert spec.moe is None and spec.dense_first == 4 and (spec.dense_layers, spec.moe_layers) == (4, 0)
    spec = parse(BASE.replace(MOE_BLOCK, "").replace("dense_first 1", "dense_first 4"))
    assert spec.dense_first == 4


def test_layers_without_block_means_no_dense_layer() -> None:
    spec = parse(BASE.replace("layers 4 { dense_first 1 }", "layers 4"))
    assert spec.dense_first == 0 and spec.moe_layers == 4


def test_direct_query_projection() -> None:
    assert parse(BASE.replace("q_lora_rank 32", "q_lora_rank 0")).attention.q_lora_rank == 0


def test_tied_head_with_mtp() -> None:
    spec = parse(BASE.replace("  norm rms", "  head { tied true }\n  mtp { depth 2 }\n  norm rms"))
    assert spec.tied_head and spec.mtp.depth == 2


def test_layout_comments_and_names() -> None:
    text = (
        '# header\n\nmodel "my model" {  # trailing comment\n'
        + BASE.split("\n", 1)[1].replace("  vocab 256\n", "  vocab 256,,\n\n  # a comment line\n")
        + "# the end, no newline"
    )
    spec = parse(text)
    assert spec.name == "my model" and spec.vocab == 256


def test_defaults_come_from_the_dataclasses() -> None:
    spec = parse(BASE)
    assert spec.moe is not None and (spec.moe.shared, spec.moe.score, spec.moe.normalize) == (1, "sigmoid", True)
    assert spec.attention.rope.layout == "half" and spec.mtp.depth == 0 and spec.dtypes.compute == "bf16"


# --------------------------------------------------------------------------------------------------------------------
# Malformed specs: each breaks BASE in one place and names where the error must point and part of its message.


def _case(case_id: str, old: str, new: str, line: int, col: int, message: str) -> object:
    return pytest.param(_broken(old, new), line, col, message, id=case_id)


_NO_FFN = "  ffn dense { hidden 128 }\n"
ALL_DENSE = BASE.replace(MOE_BLOCK, "").replace(" { dense_first 1 }", "")

MALFORMED = [
    # unknown keys
    _case("unknown-key-top-level", "train {", "trian {", 19, 1, "unknown key 'trian' at top level (did you mean"),
    _case("unknown-block-top-level", "train {", "optimizer adamw {", 19, 1, "expected one of: model, train, parallel)"),
    _case("unknown-key-nested", "v 16", "w 16", 9, 33, "unknown key 'w' in head_dim block (expected one of: nope"),
    _case("misspelled-key", "heads 4", "hedas 4", 6, 5, "'hedas' in attention block (did you mean 'heads'?)"),
    # required fields
    _case("missing-required-field", "  vocab 256\n", "", 1, 1, "missing required field 'vocab' in model block"),
    _case("missing-required-nested", "top_k 2, ", "", 14, 5, "missing required field 'top_k' in experts block"),
    _case("yarn-missing-factor", "factor 4, ", "", 10, 25, "missing required field 'factor' in yarn block"),
    pytest.param("# nothing here\n", 1, 1, "missing required field 'model' at top level", id="empty-spec"),
    # value types
    _case("word-for-int", "heads 4", "heads abc", 6, 11, "'heads' expects an integer, got 'abc'"),
    _case("float-for-int", "dim 64", "dim 64.5", 3, 7, "'dim' expects an integer, got '64.5'"),
    _case("string-for-int", "vocab 256", 'vocab "256"', 2, 9, """'vocab' expects an integer, got '"256"'"""),
    _case("word-for-float", "eps 1e-6", "eps tiny", 17, 18, "'eps' expects a number, got 'tiny'"),
    _case("bad-enum-value", "theta 10000,", "theta 10000, layout split,", 10, 32, "one of: interleaved, half; got"),
    _case("bad-routing-score", "routing sigmoid", "routing top", 15, 13, "unknown routing score 'top' (expected one"),
    _case("bad-bool", "keep_groups 1 }", "keep_groups 1, normalize yes }", 15, 58, "expects true or false, got 'yes'"),
    _case(
        "bad-dtype", "  norm rms", "  dtype { compute fp8 }\n  norm rms", 17, 19, "one of: f32, bf16, f16; got 'fp8'"
    ),
    # duplicates
    _case("duplicate-key", "  dim 64\n", "  dim 64\n  dim 32\n", 4, 3, "duplicate key 'dim' in model block (first"),
    _case("duplicate-ffn-kind", _NO_FFN, _NO_FFN * 2, 13, 3, "duplicate key 'ffn dense' in model block"),
    # syntax
    pytest.param(BASE.rstrip()[:-1], 19, 7, "unexpected end of input: this '{' is never closed", id="unclosed-brace"),
    pytest.param(BASE[: BASE.index("  ffn moe")], 1, 9, "unexpected end of input", id="unexpected-end-of-input"),
    _case("stray-character", "dim 64", "dim 64 @", 3, 10, "unexpected character '@'"),
    pytest.param(BASE + "}\n", 22, 1, "unexpected '}'; expected end of input", id="stray-closing-brace"),
    _case("unterminated-string", "model t", 'model "t', 1, 7, "unterminated string"),
    _case("block-on-next-line", "attention mla {", "attention mla\n  {", 6, 3, "a block must open on the line of"),
    # routing consistency
    _case("top-k-above-experts", "top_k 2", "top_k 9", 14, 17, "top_k (9) is larger than the number of experts (8)"),
    _case("groups-not-dividing-experts", "groups 2,", "groups 3,", 15, 23, "groups (3) does not divide experts (8)"),
    _case(
        "keep-groups-above-groups", "groups 2, keep_groups 1", "groups 4, keep_groups 5", 15, 33, "(5) exceeds groups"
    ),
    _case("top-k-above-kept-experts", "top_k 2", "top_k 5", 14, 17, "kept groups (keep_groups*experts/groups = 4)"),
    _case("no-moe-layer-left", "dense_first 1", "dense_first 4", 4, 14, "no layer would use the 'ffn moe' block"),
    _case("yarn-beta-order", "original_len 128", "original_len 128, beta_fast 1, beta_slow 2", 10, 60, "beta_fast (1)"),
    # sizes and ranges
    _case("dense-first-above-layers", "dense_first 1", "dense_first 70", 4, 14, "dense_first (70) exceeds layers (4)"),
    _case("zero-size", "heads 4", "heads 0", 6, 11, "'heads' must be positive, got 0"),
    _case("negative-size", "vocab 256", "vocab -5", 2, 9, "'vocab' must be positive, got -5"),
    _case("odd-rope-dim", "rope 8,", "rope 7,", 9, 25, "rope head dim must be even (it rotates pairs), got 7"),
    _case("negative-eps", "eps 1e-6", "eps -1e-6", 17, 18, "'eps' must be positive, got -1e-6"),
    _case("negative-lr", "lr 1e-3", "lr -1e-3", 20, 24, "'lr' must be positive, got -1e-3"),
    _case("beta-range", "betas 0.9 0.95", "betas 0.9 1.5", 20, 40, "'betas' must be in [0, 1), got 1.5"),
    _case("ema-decay-range", "train {", "train {\n  ema { decay 1.5 }", 20, 15, "'decay' must be in [0, 1), got 1.5"),
    _case("ema-without-decay", "train {", "train {\n  ema { }", 20, 3, "missing required field 'decay' in ema block"),
    # which layers are dense
    _case("missing-ffn-dense", _NO_FFN, "", 4, 14, "missing 'ffn dense' block: 1 of 4 layers are dense"),
    pytest.param(ALL_DENSE.replace(_NO_FFN, ""), 1, 1, "4 of 4 layers are dense", id="missing-ffn-dense-no-moe"),
    _case("dense-first-without-moe", MOE_BLOCK, "", 4, 14, "dense_first (1) needs an 'ffn moe' block"),
    # kinds
    _case("unknown-attention-kind", "attention mla", "attention gqa", 5, 13, "unknown attention kind 'gqa' (expected"),
    _case("unknown-ffn-kind", "ffn dense", "ffn sparse", 12, 7, "unknown ffn kind 'sparse' (expected one of: dense"),
    _case("missing-attention-kind", "attention mla", "attention", 5, 3, "'attention' needs its attention kind"),
    # values against blocks
    _case("value-for-block", "  norm rms", "  mtp 1\n  norm rms", 17, 7, "'mtp' takes no value; write its fields in"),
    _case("block-for-value", "vocab 256", "vocab { size 256 }", 2, 9, "'vocab' takes a value, not a block"),
    _case("too-many-values", "vocab 256", "vocab 1 2", 2, 11, "'vocab' takes 1 value, got 2"),
    _case("betas-one-value", "betas 0.9 0.95", "betas 0.9", 20, 30, "'betas' takes 2 values, got 1"),
    # the parallel block (appended after line 21)
    pytest.param(BASE + "parallel {\n  remat full\n}\n", 22, 1, "missing required field 'mesh' in parallel block",
                 id="parallel-without-mesh"),
    pytest.param(BASE + "parallel {\n  mesh { }\n}\n", 23, 3, "the mesh names no axis", id="parallel-empty-mesh"),
    pytest.param(BASE + "parallel {\n  mesh { fdsp 2 }\n}\n", 23, 10, "unknown key 'fdsp' in mesh block (did you mean",
                 id="parallel-unknown-axis"),
    pytest.param(BASE + "parallel {\n  mesh { fsdp 0 }\n}\n", 23, 15, "'fsdp' must be positive, got 0",
                 id="parallel-zero-axis"),
    pytest.param(BASE + "parallel {\n  mesh { fsdp 2 }\n  remat most\n}\n", 24, 9,
                 "'remat' expects one of: none, outputs, deepseek, full; got 'most'", id="parallel-bad-remat"),
    pytest.param(BASE + "parallel {\n  mesh { fsdp 2 }\n  head_loss fuse\n}\n", 24, 13,
                 "'head_loss' expects one of: unfused, fused; got 'fuse'", id="parallel-bad-head-loss"),
    pytest.param(BASE + "parallel {\n  mesh { fsdp 2 }\n  shard mode\n}\n", 24, 3,
                 "unknown key 'shard' in parallel block (did you mean 'shard_mode'?)", id="parallel-unknown-key"),
    pytest.param(BASE + "parallel {\n  mesh { fsdp 2 }\n}\nparallel {\n  mesh { fsdp 4 }\n}\n", 25, 1,
                 "duplicate key 'parallel' at top level", id="parallel-twice"),
]


@pytest.mark.parametrize(("text", "line", "col", "message"), MALFORMED)
def test_malformed_spec(text: str, line: int, col: int, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(text, "bad.dsv3")
    assert (err.value.path, err.value.line, err.value.col) == ("bad.dsv3", line, col), str(err.value)
    assert message in err.value.message


def test_ema_goes_into_the_optimizer_declaration() -> None:
    """`train { ema { decay } }` is an attribute of the IR's `dsv3.optimizer`, which the runtime reads; without the
    block the IR has none."""
    from dsv3c import build_ir
    from dsv3c.dialects import dsv3

    def decay(text: str) -> float | None:
        ops = [op for op in build_ir(parse(text)).ops if isinstance(op, dsv3.OptimizerOp)]
        return ops[0].opt_float_prop("ema_decay")

    assert decay(BASE.replace("train {", "train {\n  ema { decay 0.999 }")) == 0.999
    assert decay(BASE) is None


PARALLEL = """\
parallel {
  mesh { tensor 2, fsdp 2 }   # written in any order
  shard_mode explicit
  remat full
  head_loss fused
  target tpu-v5p-8
}
"""


def test_parallel_block() -> None:
    spec = parse(BASE + PARALLEL)
    assert spec.parallel is not None
    assert spec.parallel.mesh == {"tensor": 2, "fsdp": 2}
    p = spec.parallel
    assert (p.shard_mode, p.remat, p.head_loss, p.target) == ("explicit", "full", "fused", "tpu-v5p-8")
    assert spec.positions["model.parallel"] == (22, 1) and spec.positions["model.parallel.mesh"] == (23, 3)
    defaults = parse(BASE + "parallel { mesh { fsdp 4 } }").parallel
    assert defaults is not None
    assert (defaults.shard_mode, defaults.remat, defaults.head_loss, defaults.target) == ("auto", None, "unfused", None)
    assert parse(BASE).parallel is None


def test_parallel_block_goes_into_the_ir_as_written() -> None:
    """`dsv3.parallel` holds the block (the mesh in the canonical axis order, as `dsv3.mesh` has it), prints as one
    line of the dump and parses back; a module has at most one."""
    from dsv3c import build_ir
    from dsv3c.dialects.sharding import ParallelOp
    from dsv3c.dialects.text import parse_ir, print_ir

    text = print_ir(build_ir(parse(BASE + PARALLEL)))
    line = next(line.strip() for line in text.splitlines() if "dsv3.parallel" in line)
    assert line == ('dsv3.parallel {axes = ["fsdp", "tensor"], shape = [2 : i64, 2 : i64], mode = "explicit", '
                    'remat = "full", head_loss = "fused", target = "tpu-v5p-8"}')
    (op,) = [op for op in parse_ir(text).ops if isinstance(op, ParallelOp)]
    assert (op.sizes, op.remat_policy, op.target_name) == ({"fsdp": 2, "tensor": 2}, "full", "tpu-v5p-8")
    assert "dsv3.parallel" not in print_ir(build_ir(parse(BASE)))
    with pytest.raises(SpecError, match="a second dsv3.parallel"):
        parse_ir(text.replace(line, f"{line}\n  {line}"), "two.mlir")
    with pytest.raises(SpecError, match="remat must be one of"):
        parse_ir(text.replace('remat = "full"', 'remat = "most"'), "bad.mlir")
