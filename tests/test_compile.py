"""Compiling from shapes alone: the 671B model's report against DeepSeek-V3's published sizes, and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3c.cli import main

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _v3_param_counts() -> dict[str, int]:
    """DeepSeek-V3's parameter count from its published shapes (REFERENCE.md section 1), written independently of
    the IR builder."""
    dim, vocab, heads = 7168, 129280, 128
    q_lora, kv_lora, nope, rope, v = 1536, 512, 128, 64, 128
    experts, top_k, expert_hidden, dense_hidden = 256, 8, 2048, 18432
    attention = (
        dim + dim * q_lora + q_lora + q_lora * heads * (nope + rope)
        + dim * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v) + heads * v * dim + dim
    )
    dense = 3 * dim * dense_hidden
    routed = experts * 3 * dim * expert_hidden
    moe_fixed = dim * experts + experts + 3 * dim * expert_hidden  # gate, correction bias, shared expert
    main_model = vocab * dim * 2 + dim + 3 * (attention + dense) + 58 * (attention + moe_fixed + routed)
    active = main_model - 58 * routed * (experts - top_k) // experts
    mtp = 3 * dim + 2 * dim * dim + attention + moe_fixed + routed
    return {"total": main_model, "active": active, "mtp": mtp}


def test_671b_train_compiles_from_shapes_and_counts_parameters(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    code = main([
        "compile", str(EXAMPLES / "deepseek-v3-671b.dsv3"), "--target", "cpu", "--mode", "train",
        "--batch", "1", "--seq", "4096", "--report", str(report_path),
    ])
    assert code == 0
    report = json.loads(report_path.read_text())
    expected = _v3_param_counts()
    assert report["params_total"] == expected["total"]
    assert report["params_total"] == pytest.approx(671e9, rel=0.005)
    assert report["params_active_per_token"] == expected["active"]
    assert report["params_active_per_token"] == pytest.approx(37e9, rel=0.02)
    assert report["params_mtp"] == expected["mtp"]
    assert report["params_mtp"] == pytest.approx(11.6e9, rel=0.01)
    # the released checkpoint's 685B counts the MTP module's own copies of embedding and head
    assert report["params_total"] + report["params_mtp"] + 2 * 129280 * 7168 == pytest.approx(685e9, rel=0.005)
    for key in ("target", "devices", "mesh", "mode", "batch", "seq", "vocab", "flops_per_step", "collectives"):
        assert key in report
    assert (report["batch"], report["seq"], report["vocab"], report["mode"]) == (1, 4096, 129280, "train")
    assert set(report["memory_per_device_bytes"]) >= {"arguments", "outputs", "temp", "total"}
    # arguments hold f32 params, AdamW moments (bf16 in the V3 spec) and router biases: at least 8 bytes/param
    assert report["memory_per_device_bytes"]["arguments"] >= 8 * report["params_total"]
    assert set(report["compile_seconds"]) == {"parse", "passes", "lower", "compile"}
    # the temporaries at the step's peak, by part, read off XLA's buffer assignment: they add up to XLA's temp
    # (this CPU packing leaves no gap; the issue allows 10%)
    parts, temp = report["memory_breakdown"], report["memory_per_device_bytes"]["temp"]
    assert sum(parts.values()) == report["memory_peak"]["in_use"] == pytest.approx(temp, rel=0.1)
    assert parts["gradients"] > 0 and report["memory_peak"]["phase"] in ("forward", "backward", "update")
    out = capsys.readouterr().out
    assert "671.026B params" in out and f"temporaries {temp / 2**30:.2f} GiB, at the peak" in out


def test_maxtext_test_config_has_its_published_size(tmp_path):
    report_path = tmp_path / "r.json"
    assert main([
        "compile", str(EXAMPLES / "deepseek3-test.dsv3"), "--mode", "forward", "--batch", "1", "--seq", "256",
        "--report", str(report_path),
    ]) == 0
    assert json.loads(report_path.read_text())["params_total"] == pytest.approx(15.85e9, rel=0.002)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "tpu-v7-8"], "dsv3c: error: unknown target 'tpu-v7-8'"),
        (["--target", "tpu-v5p-3"], "is not a v5p slice size"),
        (["--mode", "decode", "-p", "dsv3-drop-mtp"], "mode 'decode' needs the dsv3-kv-cache pass"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--mesh", "data=two"], "--mesh: expected AXIS=N"),
        (["--mesh", "fsdp=3"], "do not divide 'embed' of size 64"),
        (["--mesh", "model=2"], "unknown mesh axis 'model'"),
        (["--mesh", "fsdp=16"], "the mesh needs 16 CPU devices but JAX has 8"),
        (["-p", "no-such-pass"], "known passes: dsv3-dce"),
        (["--mode", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_bad_options_are_user_errors(args, message, capsys):
    assert main(["compile", str(EXAMPLES / "tiny.dsv3"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_bad_spec_gets_positioned_error(tmp_path, capsys):
    spec = tmp_path / "bad.dsv3"
    spec.write_text((EXAMPLES / "tiny.dsv3").read_text().replace("top_k 2", "top_k 9"))
    assert main(["compile", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if "top_k 9" in text)
    assert err.startswith(f"{spec}:{line}:")
    assert "top_k (9) is larger than the number of experts (8)" in err


def test_missing_input_file(capsys):
    assert main(["compile", "no/such/model.dsv3"]) == 2
    assert "no such file" in capsys.readouterr().err
