"""Checkpoint save and restore time: the Orbax training checkpoint against the safetensors path it replaced.

The training state (parameters, AdamW moments, router biases, step, EMA) of a model of a few hundred MB, made by
`init_state` (no train step is compiled). Orbax's save is timed twice: its blocking part (what the step loop waits
for before it goes on: the copy to host memory) and its total (until the checkpoint is committed). The old path
(dsv3c before issue 11: gather every array to one host, `safetensors.numpy.save_file` under a temporary name, fsync,
rename) blocks for all of it. Restore is timed into the program's shardings (Orbax) and through `load_file` plus a
device copy (safetensors). Each figure is the median of `--reps` runs on one CPU device.

    python benchmarks/checkpoint.py [--dim 768] [--vocab 16384] [--layers 4] [--reps 3] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

import dsv3c
from dsv3c.runtime.checkpoint import Checkpoints
from dsv3c.runtime.loop import restore_state

SPEC = """
model bench {{
  vocab {vocab}
  dim {dim}
  layers {layers} {{ dense_first 1 }}
  attention mla {{ heads 8, q_lora_rank 256, kv_lora_rank 128, head_dim {{ nope 64, rope 32, v 64 }} }}
  ffn dense {{ hidden {hidden} }}
  ffn moe {{ experts 8 {{ top_k 2, shared 1, hidden {expert} }} }}
}}
train {{ ema {{ decay 0.999 }} }}
"""


def _old_save(root: Path, state: dict, step: int) -> None:
    """The safetensors checkpoint of dsv3c before Orbax: host copies, one file, fsync, rename."""
    flat = {jax.tree_util.keystr(path): np.ascontiguousarray(np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / "state.safetensors"))
    with open(tmp / "state.safetensors", "rb") as handle:
        os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def _old_restore(root: Path, step: int, template: dict) -> dict:
    arrays = load_file(str(root / f"step_{step:08d}" / "state.safetensors"))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values = [jax.numpy.asarray(arrays[jax.tree_util.keystr(path)].reshape(leaf.shape)) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/dsv3c-ckpt-bench")
    args = parser.parse_args()
    text = SPEC.format(vocab=args.vocab, dim=args.dim, layers=args.layers, hidden=4 * args.dim, expert=args.dim)
    prog = dsv3c.prepare(dsv3c.parse(text), batch=1, seq=16)
    state = prog.init_state(0)
    ema = prog.ema.init(state["params"])
    tree = {**state, "ema": ema}
    megabytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tree)) / 2**20
    params = sum(leaf.size for leaf in jax.tree.leaves(state["params"]))
    print(f"state: {params / 1e6:.1f}M parameters, {megabytes:.0f} MiB with AdamW moments and EMA")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    rows: dict[str, list[float]] = {k: [] for k in ("orbax_blocking", "orbax_total", "orbax_restore",
                                                      "safetensors_save", "safetensors_restore")}
    checkpoints = Checkpoints(root / "orbax", keep=2)
    for step in range(1, args.reps + 1):
        clock = time.perf_counter()
        checkpoints.save(step, tree, {"total_steps": 1})
        rows["orbax_blocking"].append(time.perf_counter() - clock)
        checkpoints.wait()
        rows["orbax_total"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        restored = restore_state(prog, checkpoints, step)
        jax.block_until_ready(restored)
        rows["orbax_restore"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        _old_save(root / "safetensors", tree, step)
        rows["safetensors_save"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        jax.block_until_ready(_old_restore(root / "safetensors", step, tree))
        rows["safetensors_restore"].append(time.perf_counter() - clock)
    checkpoints.close()
    restored_state, restored_ema = restored
    np.testing.assert_array_equal(np.asarray(restored_state["params"]["embed"]), np.asarray(state["params"]["embed"]))
    np.testing.assert_array_equal(np.asarray(restored_ema["embed"]), np.asarray(ema["embed"]))
    for name, seconds in rows.items():
        print(f"{name:<20} {statistics.median(seconds):7.3f} s  (runs: {', '.join(f'{s:.3f}' for s in seconds)})")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
