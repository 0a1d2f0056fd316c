"""Train-step time and compiled temporaries of recompute pipelines on this CPU, interleaved in one process.

Each pipeline's step is compiled once, then the steps run in turn (one of each per round), so that a change in the
host's load falls on all of them alike; prints the median wall time, tokens/s, XLA's temporaries and the ratio of
each time to the first pipeline's. The model is a spec with random tokens (`--spec`, default `examples/tiny.dsv3` at
batch 16 x 64), or a Hugging Face DeepSeek-V3 checkpoint with its tokens (`--hf DIR`: `config.json`,
`model.safetensors` and `train.npy`, as `benchmarks/peer_torch.py --workdir DIR` leaves them).

    python benchmarks/remat_speed_cpu.py [--hf DIR | --spec FILE --batch B --seq S] [--rounds 7] [PIPELINE ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dsv3c

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.dsv3"
PIPELINES = ("dsv3-remat{policy=deepseek}", "dsv3-fuse-head-loss{grads=forward},dsv3-remat{policy=deepseek}",
             "dsv3-fuse-head-loss{grads=forward},dsv3-remat{policy=deepseek kernels=auto}",
             "dsv3-fuse-head-loss{grads=forward},dsv3-remat{policy=deepseek kernels=attention,experts}")
"""DeepSeek's policy alone, then with the head's gradients in the forward pass, then the CPU's default (the kernels'
residuals as `kernels=auto` chooses), then every kernel's residuals kept."""


def model(args: argparse.Namespace) -> tuple[dsv3c.ModelSpec, np.ndarray]:
    """The spec and an int32 [B, S+1] batch of tokens."""
    if args.hf is None:
        spec = dsv3c.load(args.spec)
        shape = (args.batch, args.seq + 1)
        return spec, np.random.default_rng(0).integers(0, spec.vocab, shape).astype(np.int32)
    spec, _ = dsv3c.import_hf(args.hf, dtype="f32")
    return spec, np.load(Path(args.hf) / "train.npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="*", default=list(PIPELINES))
    parser.add_argument("--hf", default=None, help="a Hugging Face checkpoint directory (instead of --spec)")
    parser.add_argument("--spec", default=str(TINY), help="a .dsv3 spec, trained on random tokens (default: tiny)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    spec, tokens = model(args)
    batch = {"tokens": jnp.asarray(tokens)}
    programs, states = [], []
    for pipeline in args.pipelines:
        prog = dsv3c.compile(spec, mode="train", batch=tokens.shape[0], seq=tokens.shape[1] - 1, pipeline=pipeline)
        state, metrics = prog.train_step(prog.init_state(0), batch)
        jax.block_until_ready(metrics)
        programs.append(prog)
        states.append(state)
        print(f"compiled {pipeline}", flush=True)
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(args.rounds):
        for i, prog in enumerate(programs):
            clock = time.perf_counter()
            states[i], metrics = prog.train_step(states[i], batch)
            jax.block_until_ready((states[i], metrics))
            times[i].append(time.perf_counter() - clock)
    tokens_per_step = tokens.shape[0] * (tokens.shape[1] - 1)
    first = statistics.median(times[0])
    print("\n| pipeline | median ms | tok/s | temp MiB | time / first |\n|---|---:|---:|---:|---:|")
    for pipeline, prog, measured in zip(args.pipelines, programs, times, strict=True):
        median = statistics.median(measured)
        temp = prog.report["memory_per_device_bytes"]["temp"] / 2**20
        print(f"| `{pipeline}` | {median * 1000:,.0f} | {tokens_per_step / median:,.0f} | {temp:,.1f} | "
              f"{median / first:.2f}x |")


if __name__ == "__main__":
    main()
