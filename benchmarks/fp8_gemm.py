"""BF16 vs FP8 GEMMs on the local accelerator, through dsv3c's FP8 kernels (`runtime/fp8.py`).

    python benchmarks/fp8_gemm.py [--shapes 8192x7168x7168,4096x7168x2048] [--repeats 20]

For each (M, K, N): a BF16 GEMM with FP32 accumulation; the per-tensor FP8 GEMM (one scaled FP8 GEMM); the
fine-grained FP8 GEMM of DeepSeek-V3 (1x128 activation tiles, 128x128 weight blocks, one FP8 GEMM per 128-wide
K-block promoted to FP32), with operands already quantised and, separately, including their quantisation. Prints
milliseconds, TFLOP/s, the error of each against a float32 product of the unquantised operands, and what XLA
compiled the FP8 GEMMs to. Runs where dsv3c is not installed (it loads `runtime/fp8.py` by path).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _fp8_module():
    try:
        from dsv3c.runtime import fp8

        return fp8
    except ImportError:  # a bare machine: the kernels need only JAX
        path = Path(__file__).resolve().parents[1] / "runtime" / "fp8.py"
        spec = importlib.util.spec_from_file_location("dsv3c_fp8", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        return module


fp8 = _fp8_module()


def timed(fn, *args, repeats: int) -> float:
    """Best wall time of `repeats` calls, in ms, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernels(compiled_text: str) -> str:
    """How XLA compiled the GEMMs: cuBLAS(-LT) custom calls and Triton GEMM fusions, with their operand types."""
    found = set(re.findall(r'custom_call_target="([^"]*(?:cublas|matmul|gemm)[^"]*)"', compiled_text))
    if "__triton_gemm" in compiled_text or "triton_nested_gemm_fusion" in compiled_text:
        found.add("triton GEMM fusion")
    return ", ".join(sorted(found)) or "no GEMM kernel found"


def bench(m: int, k: int, n: int, repeats: int, backend: str) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(0.5 * rng.standard_normal((m, 1))), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    reference = np.asarray(jnp.matmul(x, w, preferred_element_type=jnp.float32, precision="highest"))
    flops = 2.0 * m * k * n
    tile_x, tile_w = fp8.Tiling("e4m3", 1, 128), fp8.Tiling("e4m3", 128, 128)
    tensor = fp8.Tiling("e4m3", 0, 0)

    def bf16(a, b):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)

    def quantised(tx, tw):
        return jax.jit(lambda a, b: (*fp8.quantize(a, tx), *fp8.quantize(b, tw)))

    def gemm(tx, tw):
        return jax.jit(lambda xq, xs, wq, ws: fp8.blocked_matmul(xq, xs, tx, wq, ws, tw, backend))

    def end_to_end(tx, tw):
        return jax.jit(lambda a, b: fp8.blocked_matmul(*fp8.quantize(a, tx), tx, *fp8.quantize(b, tw), tw, backend))

    rows = [("bf16", jax.jit(bf16), (x, w))]
    for name, tx, tw in (("fp8 per-tensor", tensor, tensor), ("fp8 1x128/128x128", tile_x, tile_w)):
        operands = quantised(tx, tw)(x, w)
        rows.append((f"{name} GEMM", gemm(tx, tw), operands))
        rows.append((f"{name} + quantise", end_to_end(tx, tw), (x, w)))
    print(f"M={m} K={k} N={n} ({backend}):")
    for name, fn, args in rows:
        ms = timed(fn, *args, repeats=repeats)
        out = np.asarray(fn(*args), np.float32)
        err = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        compiled = fn.lower(*args).compile().as_text()
        print(f"  {name:34s} {ms:8.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s  rel err {err:.2e}  [{kernels(compiled)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x7168x7168,4096x7168x2048,4096x2048x7168")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default="native", choices=list(fp8.BACKENDS))
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for shape in args.shapes.split(","):
        bench(*(int(d) for d in shape.split("x")), args.repeats, args.backend)


if __name__ == "__main__":
    main()
