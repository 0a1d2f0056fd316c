"""Importing HuggingFace DeepSeek-V3 checkpoints, checked against transformers itself.

The fixtures under `tests/fixtures/hf/` were written by `tests/fixtures/make_hf_fixture.py` with transformers'
`DeepseekV3ForCausalLM` (random weights, nonzero correction bias, norm weights away from 1): `interleave` (DeepSeek's
interleaved RoPE, one MTP layer stored at index `num_hidden_layers`), `yarn` (half-split RoPE with YaRN, six shards
and an index) and `fp8` (the `interleave` weights as FP8 E4M3 with 16x16 `weight_scale_inv` blocks). Their
`reference.npz` holds what transformers computed in float32; torch is not needed here.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.dialects import dsv3
from dsv3c.runtime.hf_import import CheckpointError, HFCheckpoint, _Reader, spec_text
from dsv3c.runtime.lower import LOWERINGS
from dsv3c.runtime.model import run_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def imported() -> dict[str, tuple[dsv3c.ModelSpec, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    out = {}
    for variant in ("interleave", "yarn", "fp8"):
        spec, params = dsv3c.import_hf(FIXTURES / variant, dtype="f32")
        out[variant] = (spec, params, dict(np.load(FIXTURES / variant / "reference.npz")))
    return out


def test_spec_follows_the_config(imported):
    spec, params, _ = imported["interleave"]
    a = spec.attention
    assert (spec.vocab, spec.dim, spec.layers, spec.dense_first) == (128, 32, 3, 1)
    assert (a.heads, a.q_lora_rank, a.kv_lora_rank, a.nope_dim, a.rope_dim, a.v_dim) == (4, 16, 16, 8, 4, 8)
    assert a.rope.layout == "interleaved" and a.rope.yarn is None
    m = spec.moe
    assert (m.experts, m.top_k, m.groups, m.keep_groups, m.scale, m.shared, m.router_bias) == (8, 2, 2, 1, 2.5, 1, True)
    assert spec.mtp.depth == 1  # layer 3 of the checkpoint
    assert params["moe.experts_gate"].shape == (2, 8, 32, 16)  # [layers, experts, in, out]
    assert np.abs(params["moe.router_bias"]).min() > 0

    yarn, _, _ = imported["yarn"]
    r = yarn.attention.rope
    assert r.layout == "half" and yarn.mtp.depth == 0
    assert (r.yarn.factor, r.yarn.original_len, r.yarn.beta_fast, r.yarn.beta_slow) == (4.0, 16, 32.0, 1.0)
    assert (r.yarn.mscale, r.yarn.mscale_all_dim) == (1.0, 1.0)


def test_config_variants_in_spec_text():
    cfg = json.loads((FIXTURES / "yarn" / "config.json").read_text())
    # older configs spell YaRN `rope_scaling` with `type`; a missing mscale_all_dim is 0 (no softmax rescale), as
    # transformers reads it
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0}
    old["rope_theta"] = 10000
    text = spec_text(old, 0)
    assert "yarn { factor 40, original_len 4096, beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 0 }" in text
    assert dsv3c.parse(text).attention.rope.yarn.mscale_all_dim == 0.0
    with pytest.raises(dsv3c.UserError, match="rope type 'llama3'"):
        spec_text({**old, "rope_scaling": {"rope_type": "llama3", "factor": 8}}, 0)
    fp8 = json.loads((FIXTURES / "fp8" / "config.json").read_text())
    assert "dtype { params bf16, compute bf16 }" in spec_text(fp8, 1)  # DeepSeek's FP8 release dequantises to bf16


@pytest.mark.parametrize("variant", ["interleave", "yarn", "fp8"])
def test_logits_match_transformers(imported, variant):
    spec, params, ref = imported[variant]
    prog = dsv3c.compile(spec, mode="forward", batch=2, seq=12)
    logits = np.asarray(prog.forward(params, ref["tokens"]))
    np.testing.assert_allclose(logits, ref["logits"], atol=ATOL, rtol=0)


def _record(rules: dict[type, list], module, params, tokens) -> None:
    """Runs the model eagerly (`disable_jit`: `lax.scan` becomes a Python loop) with the rules of the given op types
    wrapped to record their operands and results."""
    originals = {op: LOWERINGS[op] for op in rules}

    def wrap(op_type):
        def rule(op, args, ctx):
            results = originals[op_type](op, args, ctx)
            rules[op_type].append(([np.asarray(a) for a in args], [np.asarray(r) for r in results]))
            return results

        return rule

    try:
        for op_type in rules:
            LOWERINGS[op_type] = wrap(op_type)
        with jax.disable_jit():
            run_model(module, params, tokens)
    finally:
        LOWERINGS.update(originals)


@pytest.mark.parametrize("variant", ["interleave", "yarn"])
def test_routing_and_mtp_match_transformers(imported, variant):
    """Every MoE layer picks exactly transformers' experts for every token; the MTP module (loaded from layer
    `num_hidden_layers`) gives transformers' MTP logits."""
    spec, params, ref = imported[variant]
    module = dsv3c.build_ir(spec)
    tokens = np.pad(ref["tokens"], ((0, 0), (0, 1)))  # [B, S+1]: the model reads inputs and one label column
    seen = {dsv3.RouterOp: [], dsv3.CrossEntropyOp: []}
    _record(seen, module, params, tokens)
    moe_layers = ref["expert_indices"].shape[0]
    chosen = np.sort(np.stack([results[1] for _, results in seen[dsv3.RouterOp][:moe_layers]]), axis=-1)
    np.testing.assert_array_equal(chosen, ref["expert_indices"])
    if "mtp_logits" in ref:
        mtp_logits = seen[dsv3.CrossEntropyOp][1][0][0]  # the MTP loss's logits: position i predicts token i+2
        width = ref["mtp_logits"].shape[1]
        np.testing.assert_allclose(mtp_logits[:, :width], ref["mtp_logits"], atol=ATOL, rtol=0)


def test_fp8_import_dequantises_blocks(imported):
    fp8_params, plain_params = imported["fp8"][1], imported["interleave"][1]
    # the FP8 fixture was quantised from the same random model: close to it, but not equal (E4M3 has 3 mantissa bits)
    w, w0 = fp8_params["moe.wq_b"], plain_params["moe.wq_b"]
    assert w.shape == w0.shape and not np.array_equal(w, w0)
    assert np.abs(w - w0).max() < 0.07 * np.abs(w0).max()
    # norms and the router are kept in full precision, as in DeepSeek's release
    np.testing.assert_array_equal(fp8_params["moe.router"], plain_params["moe.router"])


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_fp8_128_blocks_with_ragged_edges(tmp_path):
    """The release format: [out, in] FP8 weights, `weight_scale_inv` [ceil(out/128), ceil(in/128)], w = q * s."""
    rng = np.random.default_rng(0)
    q = rng.uniform(-400, 400, (300, 200)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, (3, 2)).astype(np.float32)
    (tmp_path / "config.json").write_text("{}")
    tensors = {"w.weight": ("F8_E4M3", q), "w.weight_scale_inv": ("F32", scale)}
    _write_safetensors(tmp_path / "model.safetensors", tensors)
    reader = _Reader(HFCheckpoint(tmp_path), (128, 128))
    ours = reader.weight("w.weight", (200, 300), True, np.dtype(np.float32))  # [in, out]
    expected = q.astype(np.float32) * np.kron(scale, np.ones((128, 128), np.float32))[:300, :200]
    np.testing.assert_array_equal(ours, expected.T)
    assert reader.dequantised == ["w.weight"]


def test_shards_are_opened_lazily():
    ckpt = HFCheckpoint(FIXTURES / "yarn")
    assert len(set(ckpt.weight_map.values())) == 6 and not ckpt._files  # nothing read until a tensor is needed
    ckpt.read("model.norm.weight", (32,))
    assert len(ckpt._files) == 1


def _copy(variant: str, tmp_path: Path) -> Path:
    target = tmp_path / variant
    shutil.copytree(FIXTURES / variant, target)
    return target


def test_truncated_shard_names_the_tensor(tmp_path):
    directory = _copy("yarn", tmp_path)
    shard = directory / "model-00006-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"tensor 'model\.[\w.]+' in .*00006-of-00006.* is cut off"):
        dsv3c.import_hf(directory)


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    directory = _copy("yarn", tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.5.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight' is missing"):
        dsv3c.import_hf(directory)

    directory = _copy("interleave", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["moe_intermediate_size"] = 24  # a config that does not describe these weights
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape "
                                              r"\[16, 32\], the config implies \[24, 32\]"):
        dsv3c.import_hf(directory)


def test_cli_import_then_generate(tmp_path, capsys):
    """`dsv3c import-hf -o --params` then `dsv3c generate SPEC --ckpt DIR` reproduces transformers' greedy output."""
    ref = np.load(FIXTURES / "interleave" / "reference.npz")
    spec_path, params_dir = tmp_path / "tiny_hf.dsv3", tmp_path / "params"
    assert main(["import-hf", str(FIXTURES / "interleave"), "-o", str(spec_path), "--params", str(params_dir)]) == 0
    assert "mtp { depth 1 }" in spec_path.read_text()
    prompt = ",".join(str(t) for t in ref["prompt"][0])
    capsys.readouterr()
    assert main(["generate", str(spec_path), "--ckpt", str(params_dir), "--prompt-ids", prompt, "--max-new", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [",".join(str(t) for t in ref["greedy"][0])]
    assert main(["generate", "--hf", str(FIXTURES / "interleave"), "--ckpt", str(params_dir), "--prompt-ids", "1",
                 "--max-new", "2"]) == 2


def _edit_header(path: Path, edit) -> None:
    """Rewrites a safetensors file's JSON header through `edit` (data offsets are relative, so the data stays)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + length]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _first_tensor(header: dict) -> dict:
    return next(meta for name, meta in header.items() if name != "__metadata__")


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _drop(mapping: dict, key: str) -> dict:
    mapping.pop(key)
    return mapping


MALFORMED_HF = {
    "header-is-a-list": ("interleave", "model.safetensors", lambda h: list(h), "header is not a JSON object"),
    "header-lacks-dtype": ("interleave", "model.safetensors", lambda h: (_first_tensor(h).pop("dtype"), h)[1],
                           "unsupported or missing dtype None"),
    "string-data-offsets": ("interleave", "model.safetensors",
                            lambda h: (_first_tensor(h).update(data_offsets=["0", "4"]), h)[1], "data_offsets must be"),
    "negative-data-offsets": ("interleave", "model.safetensors",
                              lambda h: (_first_tensor(h).update(data_offsets=[-4, 0]), h)[1], "data_offsets must be"),
    "header-dtype-vs-size": ("interleave", "model.safetensors",
                             lambda h: (_first_tensor(h).update(dtype="F16"), h)[1], "bytes for shape"),
    "integer-weights": ("interleave", "model.safetensors",
                        lambda h: ({m.update(dtype="I32") for n, m in h.items() if m.get("dtype") == "F32"}, h)[1],
                        "weights must be floating point"),
    "index-invalid-json": ("yarn", "model.safetensors.index.json", None, "invalid JSON"),
    "index-lacks-weight-map": ("yarn", "model.safetensors.index.json", lambda i: _drop(i, "weight_map"),
                               "needs a \"weight_map\""),
    "config-lacks-heads": ("interleave", "config.json", lambda c: _drop(c, "num_attention_heads"),
                           "lacks 'num_attention_heads'"),
    "yarn-lacks-original-length": (
        "yarn", "config.json", lambda c: (c["rope_parameters"].pop("original_max_position_embeddings"), c)[1],
        "lacks 'original_max_position_embeddings'",
    ),
    "zero-fp8-blocks": ("fp8", "config.json",
                        lambda c: (c["quantization_config"].update(weight_block_size=[0, 0]), c)[1],
                        "weight_block_size must be two positive integers"),
    "fewer-layers-than-checkpoint": ("interleave", "config.json",
                                     lambda c: (c.update(num_hidden_layers=c["num_hidden_layers"] - 1), c)[1],
                                     "beyond num_hidden_layers"),
    "int8-config-dtype": ("interleave", "config.json", lambda c: (c.update(torch_dtype="int8", dtype="int8"), c)[1],
                          "config dtype 'int8' is not supported"),
}


@pytest.mark.parametrize("case", MALFORMED_HF)
def test_malformed_checkpoints_are_user_errors(case, tmp_path, capsys):
    """Each damaged or inconsistent checkpoint is one `dsv3c: error:` line naming the problem, exit code 2."""
    variant, file, edit, message = MALFORMED_HF[case]
    directory = _copy(variant, tmp_path)
    path = directory / file
    if edit is None:
        path.write_text("{ not json")
    elif file.endswith(".safetensors"):
        _edit_header(path, edit)
    else:
        _edit_json(path, edit)
    args = ["import-hf", str(directory), "-o", str(tmp_path / "m.dsv3"), "--params", str(tmp_path / "p")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("dsv3c: error:"), err
    assert message in err, err
