"""SIGKILL one of two training processes at a random moment, again and again: every time, the newest committed
checkpoint restores, and the run resumed from it ends exactly where an uninterrupted run ends.

Two local processes (jax.distributed on 127.0.0.1, two CPU devices each, mesh fsdp=2,expert=2) train `tiny` without
its MTP module with a checkpoint after every step. Each round resumes the run from the last round's directory, waits
for a new checkpoint to be committed, sleeps a random fraction of a second, kills one process (chosen at random)
with SIGKILL and the other one after it, and checks that the newest committed checkpoint reads back whole. A last
round runs to the end; its final parameters are compared bit for bit with an uninterrupted run's. The test suite
runs one such kill (`tests/test_multihost.py`); this is the long version.

    python benchmarks/kill_checkpoints.py [--kills 10] [--steps 100] [--seed 0] [--dir /tmp/dsv3c-kills]
"""

from __future__ import annotations

import argparse
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

import dsv3c
from dsv3c.dialects.text import print_ir
from dsv3c.pipeline import run_pipeline
from dsv3c.runtime.checkpoint import Checkpoints, load_checkpoint_params

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(spec: Path, ckpt: Path, steps: int) -> list[subprocess.Popen]:
    """Both processes of a run resuming from `ckpt`; each one's output goes to `ckpt`'s sibling `NAME.rankR.log`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    port = _free_port()
    argv = [sys.executable, "-m", "dsv3c", "train", str(spec), "--steps", str(steps), "--batch", "8", "--seq", "16",
            "--mesh", "fsdp=2,expert=2", "--devices", "2", "--save-every", "1", "--keep", "3", "--ckpt", str(ckpt),
            "--resume", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [subprocess.Popen([*argv, "--process-id", str(rank)], env=env, stderr=subprocess.STDOUT,
                             stdout=open(ckpt.with_name(f"{ckpt.name}.rank{rank}.log"), "a"))
            for rank in range(2)]


def _committed(ckpt: Path) -> set[str]:
    return {p.name for p in ckpt.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name)}


def _latest(ckpt: Path) -> int | None:
    checkpoints = Checkpoints(ckpt, create=False)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/dsv3c-kills")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = dsv3c.build_ir(dsv3c.load(str(ROOT / "examples" / "tiny.dsv3")))
    run_pipeline(module, "dsv3-drop-mtp")
    spec = root / "tiny-no-mtp.mlir"
    spec.write_text(print_ir(module))

    ckpt = root / "killed"
    for kill in range(1, args.kills + 1):
        before = _committed(ckpt) if ckpt.exists() else set()
        workers = _launch(spec, ckpt, args.steps)
        while workers[0].poll() is None and not (_committed(ckpt) - before if ckpt.exists() else set()):
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        victim = rng.randrange(2)
        os.kill(workers[victim].pid, signal.SIGKILL)
        for worker in workers:
            worker.kill()
            worker.wait()
        step = _latest(ckpt)
        params = load_checkpoint_params(ckpt)
        finite = all(np.isfinite(v).all() for v in params.values())
        print(f"kill {kill:>2}: process {victim} killed {delay:.2f}s after a new checkpoint; newest committed: "
              f"step {step}, {len(params)} parameters read back, all finite: {finite}", flush=True)
        if step is None or not finite:
            raise SystemExit("FAILED: no restorable checkpoint")
        if step >= args.steps:
            raise SystemExit(f"the run finished before kill {kill}: use more --steps")

    for name in ("killed", "straight"):
        workers = _launch(spec, root / name, args.steps)
        if any(worker.wait() for worker in workers):
            raise SystemExit(f"FAILED: the {name} run did not finish (see {root}/{name}.rank*.log)")
    got, want = load_checkpoint_params(ckpt), load_checkpoint_params(root / "straight")
    same = all(np.array_equal(got[k], want[k]) for k in want)
    print(f"resumed after {args.kills} kills to step {_latest(ckpt)}: parameters bit-identical to an uninterrupted "
          f"run: {same}")
    if not same:
        raise SystemExit("FAILED: the resumed run differs")


if __name__ == "__main__":
    main()
