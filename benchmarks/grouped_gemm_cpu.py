"""Grouped expert GEMMs on XLA:CPU: `lax.ragged_dot` (lowered densely: every row through every expert) against the
routed-size tiled kernel (`runtime/kernels/grouped_gemm_cpu.py`), forward and forward + backward.

    JAX_PLATFORMS=cpu python benchmarks/grouped_gemm_cpu.py [--shapes 8192x512x256x16x4,...] [--dtype f32]
        [--tiles 0,64,128] [--repeats 5] [--skip-ragged]

A shape is T x K x N x G x top_k: T rows (tokens x top_k), K in, N out, G experts. Each token picks top_k distinct
experts uniformly at random; the rows are sorted by expert as `routed_experts` sorts them. Prints the least process
CPU time (all threads) of `repeats` calls in ms for: one dense [T, K] x [K, N] GEMM (the routed size: what a perfect
grouped GEMM would cost), ragged_dot, and the tiled kernel at each tile size (0: its default `tile_rows`), then the
ratios ragged / tiled and tiled / dense. Forward + backward is one `jax.vjp` call (the output and both cotangents).

`--decode LxRxKxNxG` times instead a decode step's case: R rows (R <= G) through L layers of stacked expert weights
[L, G, K, N] in one `lax.scan`, as a model's layer stack runs them, with the kernel's per-row form (each row's weights
gathered) against its group loop on the same rows, and prints the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsv3c.runtime.kernels import grouped_gemm_cpu as kernel

SHAPES = "8192x512x256x16x4,8192x512x512x16x4,4096x512x256x64x8,2048x256x128x256x8"
"""batch 4 x seq 512 x top-4 on 16 experts (two expert widths), then top-8 over 64 and 256 experts scaled down."""



def timed(fn: Callable, *args, repeats: int) -> float:
    """Least process CPU time (all threads) of `repeats` calls, in ms, after a warm-up call. CPU time rather than
    wall time because the host's cores are shared: it counts the work done, not the waiting for a core."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        best = min(best, time.process_time() - start)
    return best * 1e3


def problem(rows: int, k: int, n: int, groups: int, top_k: int, dtype, seed: int = 0):
    """Rows sorted by a random top-k routing of rows // top_k tokens, weights, group sizes and an output cotangent."""
    rng = np.random.default_rng(seed)
    tokens = rows // top_k
    choice = np.argsort(rng.random((tokens, groups)), axis=1)[:, :top_k].reshape(-1)
    sizes = np.bincount(choice, minlength=groups).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((rows, k)) / np.sqrt(k), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)), dtype)
    d_out = jnp.asarray(rng.standard_normal((rows, n)), dtype)
    return x, w, jnp.asarray(sizes), d_out


def forward_backward(gemm: Callable) -> Callable:
    """jit of (x, w, sizes, d_out) -> (out, d_x, d_w)."""

    def run(x, w, sizes, d_out):
        out, vjp = jax.vjp(lambda a, b: gemm(a, b, sizes), x, w)
        return out, *vjp(d_out)

    return jax.jit(run)


def decode_in_scan(layers: int, rows: int, k: int, n: int, groups: int, repeats: int) -> None:
    """Per-row form against the group loop for R <= G rows inside a scan over the layers' stacked weights: the loop's
    weights operand is a copy of the layer's whole [G, K, N] slice, the per-row gather reads only the rows' groups."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, k)) / np.sqrt(k), jnp.float32)
    w = jnp.asarray(rng.standard_normal((layers, groups, k, n)), jnp.float32)
    sizes = jnp.asarray(np.bincount(rng.choice(groups, rows, replace=False), minlength=groups), jnp.int32)
    tile = kernel.TILES[-1]
    forms = {"group loop": lambda a, b: kernel._grouped_gemm(a, b, sizes, tile),
             "per row": lambda a, b: kernel.tiled_grouped_gemm(a, b, sizes)}
    times = {}
    for name, gemm in forms.items():
        step = jax.jit(lambda h, stack, gemm=gemm: lax.scan(lambda c, wl: (c + gemm(c, wl)[:, :1], None), h, stack)[0])
        times[name] = timed(step, x, w, repeats=repeats)
        print(f"decode {layers}x{rows}x{k}x{n}x{groups} {name:>10}: {times[name]:7.3f} CPU ms", flush=True)
    print(f"group loop / per row: {times['group loop'] / times['per row']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated TxKxNxGxTOPK")
    parser.add_argument("--dtype", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--tiles", default="0", help="comma-separated tile sizes of the kernel (0: its default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-ragged", action="store_true", help="time only the dense GEMM and the kernel")
    parser.add_argument("--decode", default=None, help="LxRxKxNxG: per-row form against the group loop in a scan")
    args = parser.parse_args()
    if args.decode:
        decode_in_scan(*(int(v) for v in args.decode.split("x")), repeats=args.repeats)
        return
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    tiles = [int(t) for t in args.tiles.split(",")]

    print(f"{jax.devices()[0].device_kind}, {args.dtype}, least of {args.repeats}; CPU ms (all threads)")
    header = f"{'T x K x N x G x top_k':>24} {'pass':>4} {'tile':>4} {'dense':>8} {'ragged':>9} {'tiled':>8}"
    print(header + f" {'ragged/tiled':>12} {'tiled/dense':>11}")
    for shape in args.shapes.split(","):
        rows, k, n, groups, top_k = (int(v) for v in shape.split("x"))
        x, w, sizes, d_out = problem(rows, k, n, groups, top_k, dtype)

        def dense(a, b, s):
            return jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype)

        for name, wrap in (("fwd", lambda g: jax.jit(lambda a, b, s, d: g(a, b, s))), ("f+b", forward_backward)):
            base = timed(wrap(dense), x, w, sizes, d_out, repeats=args.repeats)
            ragged = None if args.skip_ragged else timed(wrap(lax.ragged_dot), x, w, sizes, d_out,
                                                         repeats=args.repeats)
            for tile in tiles:
                size = tile or kernel.tile_rows(rows, groups)
                gemm = partial(kernel.tiled_grouped_gemm, tile=size)
                ours = timed(wrap(gemm), x, w, sizes, d_out, repeats=args.repeats)
                ragged_text = "-" if ragged is None else f"{ragged:9.1f}"
                ratio = "-" if ragged is None else f"{ragged / ours:12.1f}"
                print(f"{shape:>24} {name:>4} {size:>4} {base:8.1f} {ragged_text:>9} {ours:8.1f} {ratio:>12}"
                      f" {ours / base:11.2f}", flush=True)


if __name__ == "__main__":
    main()
