"""Multi-process training through jax.distributed: two local processes of two CPU devices each train exactly like one
process of four devices with the same global mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import dsv3c
from dsv3c.dialects.text import print_ir
from dsv3c.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--steps", "3", "--batch", "8", "--seq", "16"]
MESH = ["--mesh", "fsdp=2,expert=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI's --devices sets the device count
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _read(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tiny_without_mtp(tmp_path: Path) -> Path:
    """`tiny`'s IR without the MTP module, and so without its share of the compile time: what this test checks is
    the distribution, not the model."""
    module = dsv3c.build_ir(dsv3c.load(str(ROOT / "examples" / "tiny.dsv3")))
    run_pipeline(module, "dsv3-drop-mtp")
    path = tmp_path / "tiny-no-mtp.mlir"
    path.write_text(print_ir(module))
    return path


def test_two_processes_train_like_one(tmp_path):
    train = ["train", str(_tiny_without_mtp(tmp_path)), *OPTIONS]
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "dsv3c", *train, *MESH, "--devices", "2", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(rank), "--metrics", str(tmp_path / f"rank{rank}.jsonl")],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    single = subprocess.run(
        [sys.executable, "-m", "dsv3c", *train, *MESH, "--devices", "4", "--metrics", str(tmp_path / "one.jsonl")],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert single.returncode == 0, single.stderr[-2000:]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-2000:]
    reference = _read(tmp_path / "one.jsonl")
    assert [m["step"] for m in reference] == [1, 2, 3]
    for rank in range(2):
        got = _read(tmp_path / f"rank{rank}.jsonl")
        for key in ("loss", "lm_loss", "balance_loss", "grad_norm"):
            np.testing.assert_allclose([m[key] for m in got], [m[key] for m in reference], rtol=1e-5, err_msg=key)
    assert reference[-1]["loss"] < reference[0]["loss"] + 0.5  # it is training, not diverging
