"""Plain versus blockwise causal MLA attention on XLA:CPU: wall time and compiled temporaries.

The plain form (`mla_attention`, the default lowering) materialises [B, H, S, S] float32 scores and probabilities;
the blockwise form (`runtime/kernels/blockwise_attention.py`) holds one tile of them at a time and skips the tiles
the causal mask removes. For each sequence length, in one process: the forward and the forward + backward (a
`jax.vjp` with a fixed cotangent, all five input gradients) of each form, jit-compiled once, timed as the median of
several runs after a warm-up, and XLA's temporary bytes of each compiled program. A plain program whose
temporaries exceed --max-temp-gib is compiled (for its memory figure) but not run, so the table says so rather than
the host running out of memory. The host's load average is printed, since wall times on a shared host vary.

    JAX_PLATFORMS=cpu python benchmarks/attention_cpu.py [--seqs 512 2048 8192] [--heads 16] [--runs 3]
        [--block-q N] [--block-k N] [--max-temp-gib 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsv3c.runtime.kernels.blockwise_attention import blockwise_attention, default_blocks
from dsv3c.runtime.lower.attention import mla_attention

MIB = 2.0**20


def inputs(seq: int, args: argparse.Namespace) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Random (q_nope, q_pe, k_nope, k_pe, v) in `--dtype` at batch 1, S = T = seq, and an output cotangent."""
    keys = jax.random.split(jax.random.key(0), 6)
    h, n, r, dv = args.heads, args.nope, args.rope, args.v_dim
    shapes = [(1, seq, h, n), (1, seq, h, r), (1, seq, h, n), (1, seq, r), (1, seq, h, dv)]
    dtype = jnp.dtype(args.dtype)
    operands = tuple(jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes, strict=False))
    return operands, jax.random.normal(keys[5], (1, seq, h, dv), dtype)


def programs(attention: Callable[..., jax.Array]) -> dict[str, Callable[..., object]]:
    """The forward and the forward + backward of one attention form, as functions of (operands, cotangent)."""

    def forward(operands, _cotangent):
        return attention(*operands)

    def forward_backward(operands, cotangent):
        out, pullback = jax.vjp(attention, *operands)
        return out, pullback(cotangent)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def median_seconds(compiled, operands, cotangent, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up call."""
    jax.block_until_ready(compiled(operands, cotangent))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(operands, cotangent))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(fn, operands, cotangent, runs: int, max_temp: float) -> tuple[float | None, float]:
    """(median seconds, or None when the temporaries exceed max_temp bytes; temporary bytes) of one program."""
    compiled = jax.jit(fn).lower(operands, cotangent).compile()
    temp = float(compiled.memory_analysis().temp_size_in_bytes)
    if temp > max_temp:
        return None, temp
    return median_seconds(compiled, operands, cotangent, runs), temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--nope", type=int, default=64)
    parser.add_argument("--rope", type=int, default=32)
    parser.add_argument("--v-dim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per program (at most 2 above seq 4096)")
    parser.add_argument("--block-q", type=int, help="query rows per tile (default: default_blocks(seq))")
    parser.add_argument("--block-k", type=int, help="keys per tile (default: default_blocks(seq))")
    parser.add_argument("--max-temp-gib", type=float, default=8.0, help="run no program with more temporaries")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="operands' dtype (scores and softmax statistics are float32 either way)")
    parser.add_argument("--forms", nargs="+", default=["plain", "blockwise"], choices=["plain", "blockwise"])
    args = parser.parse_args()
    scale = float(args.nope + args.rope) ** -0.5
    forms = {
        "plain": lambda *ops: mla_attention(*ops, scale),
        "blockwise": lambda *ops: blockwise_attention(*ops, scale, block_q=args.block_q, block_k=args.block_k),
    }
    forms = {name: forms[name] for name in args.forms}
    tiles = ", ".join(f"{q if args.block_q is None else args.block_q} x {k if args.block_k is None else args.block_k}"
                      f" at {s}" for s in args.seqs for q, k in [default_blocks(s)])
    print(f"causal MLA attention, XLA:CPU ({jax.devices()[0].device_kind}), {args.dtype}, batch 1, H={args.heads}, "
          f"nope {args.nope}, rope {args.rope}, v {args.v_dim}, blockwise tiles {tiles}; "
          f"median ms of {args.runs} runs ({min(args.runs, 2)} above seq 4096) after a warm-up; load average "
          f"{os.getloadavg()[1]:.1f} on {os.cpu_count()} CPUs")
    header = " | ".join(f"{name} ms | {name} temp MiB" for name in forms)
    ratios = " | plain / blockwise ms | plain / blockwise temp" if len(forms) == 2 else ""
    print(f"| seq | pass | {header}{ratios} |")
    print("|---|---|" + "---|---|" * len(forms) + ("---|---|" if ratios else ""))
    start = time.perf_counter()
    for seq in args.seqs:
        operands, cotangent = inputs(seq, args)
        runs = args.runs if seq <= 4096 else min(args.runs, 2)
        for pass_name in ("fwd", "fwd+bwd"):
            rows = {name: measure(programs(attention)[pass_name], operands, cotangent, runs,
                                  args.max_temp_gib * 2.0**30) for name, attention in forms.items()}
            cells = " | ".join(("not run" if sec is None else f"{sec * 1e3:,.1f}") + f" | {temp / MIB:,.1f}"
                               for sec, temp in rows.values())
            if ratios:
                (plain_sec, plain_temp), (block_sec, block_temp) = rows["plain"], rows["blockwise"]
                speed = "-" if plain_sec is None else f"{plain_sec / block_sec:.2f}"
                cells += f" | {speed} | {plain_temp / block_temp:,.1f}"
            print(f"| {seq} | {pass_name} | {cells} |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[1]:.1f}; programs over "
          f"{args.max_temp_gib} GiB of temporaries are compiled for their memory figure but not run")


if __name__ == "__main__":
    main()
