"""Multi-process training through jax.distributed, with Orbax checkpoints. Two local processes of two CPU devices
each (mesh fsdp=2,expert=2) train `tiny` (without MTP) with a checkpoint after every step until one of them is
SIGKILLed at a random moment: the newest committed checkpoint holds the parameters an uninterrupted run in one
process on eight devices with another mesh (fsdp=2,expert=4) has at that step, and resumed in one such process it
continues with that run's losses. (The uninterrupted run and the resumed one compile the same program, so the
second finds it in the compilation cache.)"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dsv3c
from dsv3c.dialects.text import print_ir
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.checkpoint import Checkpoints, load_checkpoint_params, step_dir_name

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 8  # the run's planned length (its learning-rate schedule); the killed run would train this far
OPTIONS = ["--batch", "8", "--seq", "16", "--total-steps", str(TOTAL), "--save-every", "1"]
MESH = ["--mesh", "fsdp=2,expert=2"]  # the two processes'
ONE_PROCESS = ["--mesh", "fsdp=2,expert=4", "--devices", "8"]  # the uninterrupted and the resumed run's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    """The suite's environment without its eight simulated devices (the CLI's --devices sets the count), keeping
    its LLVM level (tests/conftest.py)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _read(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tiny_without_mtp(directory: Path) -> Path:
    """`tiny`'s IR without the MTP module, and so without its share of the compile time: what this test checks is
    the distribution and the checkpoints, not the model."""
    module = dsv3c.build_ir(dsv3c.load(str(ROOT / "examples" / "tiny.dsv3")))
    run_pipeline(module, "dsv3-drop-mtp")
    path = directory / "tiny-no-mtp.mlir"
    path.write_text(print_ir(module))
    return path


def _train(spec: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsv3c", "train", str(spec), *OPTIONS, *options], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed(ckpt: Path) -> bool:
    """Whether a checkpoint has been renamed into place (Orbax writes under `step_N.orbax-checkpoint-tmp-*`)."""
    return any(re.fullmatch(r"step_\d{8}", path.name) for path in ckpt.glob("step_*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, int, list[dict[str, float]]]:
    """Two processes train with a checkpoint after every step; once the first is committed, after a random delay,
    one of them (chosen at random) is SIGKILLed, and the other after it (it would wait for its peer forever).
    Beside them, the uninterrupted run in one process on eight devices with another mesh. Returns the spec, the
    directory, the killed run's newest committed step and the uninterrupted run's metrics per step.
    `benchmarks/kill_checkpoints.py` repeats the kill ten times."""
    directory = tmp_path_factory.mktemp("multihost")
    spec = _tiny_without_mtp(directory)
    reference = _train(spec, "--steps", str(TOTAL), *ONE_PROCESS, "--ckpt", str(directory / "reference"),
                       "--keep", str(TOTAL), "--metrics", str(directory / "reference.jsonl"))
    port = _free_port()
    ckpt = directory / "killed"
    workers = [
        _train(spec, "--steps", str(TOTAL), *MESH, "--devices", "2", "--ckpt", str(ckpt), "--keep", "3",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank))
        for rank in range(2)
    ]
    deadline = time.monotonic() + 500
    while not _committed(ckpt) and time.monotonic() < deadline and all(w.poll() is None for w in workers):
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.3))
    victim = random.choice(workers)
    os.kill(victim.pid, signal.SIGKILL)
    outputs = []
    for worker in (victim, *(w for w in workers if w is not victim)):
        worker.kill()
        outputs.append(worker.communicate(timeout=60)[0])
    checkpoints = Checkpoints(ckpt, create=False)
    step = checkpoints.latest_step()
    checkpoints.close()
    assert step is not None, "\n".join(o[-2000:] for o in outputs)
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output[-3000:]
    metrics = _read(directory / "reference.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, TOTAL + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"] + 0.5  # it is training, not diverging
    return spec, directory, step, metrics


def test_killed_process_leaves_the_runs_state_in_its_newest_checkpoint(runs):
    """Whatever the moment of the kill, the newest committed checkpoint reads back whole, and holds the
    parameters the uninterrupted run had at that step (to float32 summation order across processes)."""
    _, directory, step, _ = runs
    got = load_checkpoint_params(directory / "killed")
    want = load_checkpoint_params(directory / "reference" / step_dir_name(step))
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs):
    """The killed run's checkpoint (of step s, at most TOTAL - 2, with whatever the kill left half-written beside
    it) continues in one process on eight devices as fsdp=2,expert=4 with the uninterrupted run's losses to 1e-6."""
    spec, directory, step, reference = runs
    start = min(step, TOTAL - 2)
    ckpt = directory / "resumed"
    shutil.copytree(directory / "killed", ckpt)
    for later in range(start + 1, step + 1):
        shutil.rmtree(ckpt / step_dir_name(later))
    run = _train(spec, "--steps", str(TOTAL), *ONE_PROCESS, "--ckpt", str(ckpt), "--resume", "--metrics",
                 str(directory / "resumed.jsonl"))
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-3000:]
    assert f"{step_dir_name(start)} at step {start}" in output, output[-3000:]
    got = _read(directory / "resumed.jsonl")
    assert [m["step"] for m in got] == list(range(start + 1, TOTAL + 1))
    for key in ("loss", "lm_loss", "balance_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in reference[start:]], rtol=1e-6, err_msg=key)
