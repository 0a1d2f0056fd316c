"""Exporting to the HuggingFace DeepSeek-V3 layout, checked against the checkpoints transformers itself wrote.

The fixtures under `tests/fixtures/hf/` are transformers' `DeepseekV3ForCausalLM` saved with `save_pretrained`: an
export of their imported parameters must give back every one of their tensors, name, dtype and bits; importing an
export must give back the parameters bit for bit, and their logits are then transformers' recorded ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.runtime import hf_export
from dsv3c.runtime.checkpoint import Checkpoints
from dsv3c.runtime.hf_import import HFCheckpoint
from dsv3c.runtime.model import param_infos
from dsv3c.runtime.train import split_params

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"


@pytest.fixture(scope="module")
def imported() -> dict[str, tuple[dsv3c.ModelSpec, dict[str, np.ndarray]]]:
    return {v: dsv3c.import_hf(FIXTURES / v, dtype="f32") for v in ("interleave", "yarn")}


@pytest.mark.parametrize("variant", ["interleave", "yarn"])
def test_export_rewrites_transformers_tensors_and_imports_bit_for_bit(imported, variant, tmp_path):
    spec, params = imported[variant]
    out = dsv3c.export_hf(spec, params, tmp_path / "hf", shard_bytes=64 << 10)
    theirs, ours = HFCheckpoint(FIXTURES / variant), HFCheckpoint(out)
    assert set(ours.weight_map) == set(theirs.weight_map)
    for name in theirs.weight_map:
        a, b = theirs.read(name), ours.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(ours.weight_map.values()) == {f.name for f in shards}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(theirs.read(n).nbytes for n in theirs.weight_map)

    spec2, params2 = dsv3c.import_hf(out, dtype="f32")
    assert dataclasses.replace(spec2, name=spec.name, path=spec.path) == spec
    assert params2.keys() == params.keys()
    for name, value in params.items():
        assert params2[name].dtype == value.dtype and params2[name].tobytes() == value.tobytes(), name


def test_exported_model_gives_transformers_logits(imported, tmp_path):
    spec, params = imported["interleave"]
    ref = np.load(FIXTURES / "interleave" / "reference.npz")
    spec2, params2 = dsv3c.import_hf(dsv3c.export_hf(spec, params, tmp_path / "hf"), dtype="f32")
    with jax.default_matmul_precision("highest"):
        prog = dsv3c.prepare(spec2, mode="forward", batch=2, seq=12)
        logits = np.asarray(prog.forward(params2, ref["tokens"]))
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def _block_fp8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy's DeepSeek block quantisation of an HF weight [out, in]: scale = amax / 448 per block (1 for a zero
    block), values = w * (1 / scale) in E4M3."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = np.zeros((br * block, bc * block), np.float32)
    padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(br, block, bc, block)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax * np.float32(1 / 448), np.float32(1)).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:rows, :cols]
    values = np.clip(w * (np.float32(1) / full), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return values, scale


def test_fp8_export_imports_as_the_dequantised_weights(imported, tmp_path):
    spec, params = imported["interleave"]
    out = dsv3c.export_hf(spec, params, tmp_path / "hf", fp8=True, block=16)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [16, 16]
    ckpt = HFCheckpoint(out)
    w = params["moe.experts_down"][1, 5].T  # layer 2's expert 5, HF [out, in] = [32, 16]
    values, scale = _block_fp8(w, 16)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert ckpt.read(name).dtype == ml_dtypes.float8_e4m3fn
    assert ckpt.read(name).tobytes() == values.tobytes()
    np.testing.assert_array_equal(ckpt.read(name.replace("weight", "weight_scale_inv")), scale)
    assert ckpt.read("model.layers.1.mlp.gate.weight").dtype == np.float32  # the router stays full precision

    _, back = dsv3c.import_hf(out, dtype="f32")
    for key, hf_name in (("moe.wkv_a", "self_attn.kv_a_proj_with_mqa"), ("dense.ffn_up", "mlp.up_proj")):
        layer = 1 if key.startswith("moe.") else 0
        hf_w = params[key][0].T
        q, s = _block_fp8(hf_w, 16)
        dequantised = q.astype(np.float32) * np.repeat(np.repeat(s, 16, 0), 16, 1)[: hf_w.shape[0], : hf_w.shape[1]]
        assert ckpt.read(f"model.layers.{layer}.{hf_name}.weight").dtype == ml_dtypes.float8_e4m3fn
        np.testing.assert_array_equal(back[key][0], dequantised.T)
    assert not np.array_equal(back["moe.wkv_a"], params["moe.wkv_a"])
    np.testing.assert_array_equal(back["moe.router"], params["moe.router"])


def test_cli_exports_a_training_checkpoint(imported, tmp_path, capsys):
    spec, params = imported["yarn"]
    spec_path = tmp_path / "m.dsv3"
    spec_path.write_text(hf_export_spec_text(spec))
    infos = param_infos(dsv3c.build_ir(dsv3c.load(spec_path)))
    state = {**split_params(infos, params), "step": np.int32(7)}
    checkpoints = Checkpoints(tmp_path / "ckpt")
    checkpoints.save(7, state, {"total_steps": 7})
    checkpoints.wait()
    checkpoints.close()
    assert main(["export-hf", str(spec_path), "--ckpt", str(tmp_path / "ckpt"), "-o", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().err
    _, back = dsv3c.import_hf(tmp_path / "hf", dtype="f32")
    assert all(back[k].tobytes() == v.tobytes() for k, v in params.items())

    # with --ema: the checkpoint's moving average of the trained parameters, the router biases as trained
    ema = {name: value * 0.5 for name, value in state["params"].items()}
    checkpoints = Checkpoints(tmp_path / "ema-ckpt")
    checkpoints.save(7, {**state, "ema": ema}, {"total_steps": 7})
    checkpoints.wait()
    checkpoints.close()
    assert main(["export-hf", str(spec_path), "--ckpt", str(tmp_path / "ema-ckpt"), "-o", str(tmp_path / "hf-ema"),
                 "--ema"]) == 0
    _, back = dsv3c.import_hf(tmp_path / "hf-ema", dtype="f32")
    assert all(back[k].tobytes() == {**ema, **state["router_bias"]}[k].tobytes() for k in params)

    failing = [
        (["-o", str(tmp_path / "hf")], "already exists and is not an empty directory"),
        (["-o", str(tmp_path / "e"), "--ema"], "holds no EMA of the parameters"),
    ]
    for extra, message in failing:
        assert main(["export-hf", str(spec_path), "--ckpt", str(tmp_path / "ckpt"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    other = Path(dsv3c.__file__).resolve().parents[1] / "examples" / "tiny.dsv3"
    assert main(["export-hf", str(other), "--ckpt", str(tmp_path / "ckpt"), "-o", str(tmp_path / "t")]) == 2
    assert "the spec's model has" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()


def hf_export_spec_text(spec: dsv3c.ModelSpec) -> str:
    """The spec import-hf writes for `spec`'s exported config."""
    from dsv3c.runtime.hf_import import spec_text

    return spec_text(hf_export.hf_config(spec), spec.mtp.depth, "m", "f32")


def test_an_interrupted_export_leaves_nothing(imported, tmp_path, monkeypatch):
    spec, params = imported["interleave"]
    written = []

    def fail_on_second(path, items):
        if written:
            raise OSError("disk full")
        written.append(path)
        original(path, items)

    original = hf_export._write_shard
    monkeypatch.setattr(hf_export, "_write_shard", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        dsv3c.export_hf(spec, params, tmp_path / "hf", shard_bytes=64 << 10)
    assert written and list(tmp_path.iterdir()) == []
