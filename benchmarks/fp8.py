"""DeepSeek-V3's fine-grained FP8 recipe (dsv3-fp8-quant): quantisation error, training loss, memory.

    python benchmarks/fp8.py quant                      # (a) fine-grained vs per-tensor scaling, outlier tensors
    python benchmarks/fp8.py train [--steps 300]        # (b) tiny and a larger small model, BF16 vs FP8
    python benchmarks/fp8.py memory [--target gpu-h100] # (c) the 671B spec's memory report, BF16 vs FP8
    python benchmarks/fp8.py all

(a) quantises synthetic tensors shaped like real ones (see `tensors`) per 1x128 tile and per tensor (E4M3, amax
scales) and prints three errors: mean over tokens of the token's relative L2 error (energy-weighted), mean
elementwise relative error (how well each value survives) and the share of non-zero values flushed to zero, plus
the relative error of a GEMM with a random weight computed by the lowering. (b) trains each model from the same
seed on the same synthetic stream with BF16 compute and with FP8 GEMMs (CPU: exact emulation), and prints the
relative gap of the final loss (last step, and mean of the last 20 steps). (c) compiles the 671B training step
ahead of time from shapes, with and without FP8, and prints XLA's memory figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# (a) quantisation error
# ---------------------------------------------------------------------------------------------------------------


def tensors(rng: np.random.Generator, m: int = 1024, k: int = 2048) -> dict[str, np.ndarray]:
    """Outlier patterns of LLM tensors. SwiGLU outputs (a down projection's input) are heavy-tailed with per-token
    scales; one token in 128 carries two "massive activations" (Sun et al. 2024: up to 100,000x typical values).
    Post-norm inputs have a few channels 20-100x larger. Gradients vary by orders of magnitude between tokens."""
    g, u = rng.standard_normal((m, k)), rng.standard_normal((m, k))
    swiglu = g / (1 + np.exp(-g)) * u * np.exp(0.5 * rng.standard_normal((m, 1)))
    median = np.median(np.abs(swiglu))
    out = {}
    for factor in (1e3, 1e4, 1e5):
        x = swiglu.copy()
        tokens, channels = rng.choice(m, m // 128, replace=False), rng.choice(k, 2, replace=False)
        x[np.ix_(tokens, channels)] = factor * median * rng.choice([-1.0, 1.0], (len(tokens), 2))
        out[f"SwiGLU out, massive {factor:.0e} x median"] = x
    for factor in (20.0, 100.0):
        x = rng.standard_normal((m, k))
        x[:, rng.choice(k, k // 256, replace=False)] *= factor
        out[f"post-norm, {k // 256} channels x{factor:.0f}"] = x
    out["gradient, token RMS over 1e-6..1"] = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-6, 0, (m, 1))
    return {name: x.astype(np.float32) for name, x in out.items()}


def quant_errors(x: np.ndarray, tile: tuple[int, int]) -> dict[str, float]:
    import jax

    from dsv3c.runtime.fp8 import Tiling, dequantize, quantize

    t = Tiling("e4m3", *tile)
    values, scales = jax.jit(lambda a: quantize(a, t))(x)
    back = np.asarray(dequantize(values, scales, t), np.float64)
    err = np.abs(back - x)
    nonzero = x != 0
    return {
        "token": float(np.mean(np.linalg.norm(err, axis=1) / np.linalg.norm(x, axis=1))),
        "element": float(np.mean(err[nonzero] / np.abs(x[nonzero]))),
        "flushed": float(np.mean(np.asarray(values, np.float32)[nonzero] == 0)),
    }


def gemm_error(x: np.ndarray, w: np.ndarray, per_tensor: bool) -> float:
    """Mean per-token relative error of the lowering's FP8 GEMM (exact emulation) against float64."""
    import jax

    from dsv3c.runtime.fp8 import Tiling, blocked_matmul, quantize

    tx = Tiling("e4m3", 0, 0) if per_tensor else Tiling("e4m3", 1, 128)
    tw = Tiling("e4m3", 0, 0) if per_tensor else Tiling("e4m3", 128, 128)

    def run(a, b):
        return blocked_matmul(*quantize(a, tx), tx, *quantize(b, tw), tw, "exact")

    y = np.asarray(jax.jit(run)(x, w), np.float64)
    exact = x.astype(np.float64) @ w
    return float(np.mean(np.linalg.norm(y - exact, axis=1) / np.linalg.norm(exact, axis=1)))


def bench_quant() -> dict:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2048, 512)) / math.sqrt(2048)).astype(np.float32)
    rows = {}
    print(f"{'tensor (1024 x 2048, E4M3)':42s} {'per-token L2 err':>20s} {'elementwise err':>20s} "
          f"{'flushed to 0':>16s} {'GEMM err':>20s}")
    print(f"{'':42s} {'1x128 / tensor':>20s} {'1x128 / tensor':>20s} {'1x128 / tensor':>16s} {'1x128 / tensor':>20s}")
    for name, x in tensors(rng).items():
        fine, coarse = quant_errors(x, (1, 128)), quant_errors(x, (0, 0))
        gemm = (gemm_error(x, w, False), gemm_error(x, w, True))
        rows[name] = {"1x128": fine, "tensor": coarse, "gemm": gemm}
        print(
            f"{name:42s} {fine['token']:.4f} / {coarse['token']:.4f} ({coarse['token'] / fine['token']:4.1f}x) "
            f"{fine['element']:.4f} / {coarse['element']:.4f} ({coarse['element'] / fine['element']:4.1f}x) "
            f"{fine['flushed']:6.1%} / {coarse['flushed']:6.1%} "
            f"{gemm[0]:.4f} / {gemm[1]:.4f} ({gemm[1] / gemm[0]:4.1f}x)"
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# (b) training: BF16 vs FP8
# ---------------------------------------------------------------------------------------------------------------

SMALL = """\
# A larger small model for the FP8 benchmark: DeepSeek-V3's structure at width 256, 3.8M parameters (13x tiny).
# The vocabulary stays small so that the synthetic stream (next token = f(previous two)) is learnable in 300 steps.
model small {
  vocab 256
  dim 256
  layers 4 { dense_first 1 }
  attention mla {
    heads 4
    q_lora_rank 128
    kv_lora_rank 128
    head_dim { nope 32, rope 16, v 32 }
  }
  ffn dense { hidden 512 }
  ffn moe {
    experts 8 { top_k 2, shared 1, hidden 128 }
    routing sigmoid { groups 2, keep_groups 2, scale 1.0, normalize true, bias true }
    balance { bias_rate 0.001, seq_aux 0.0001 }
  }
  mtp { depth 1, weight 0.3 }
  init { std 0.02 }
  dtype { params f32, compute bf16 }
}
train {
  optimizer adamw { lr 3e-3, betas 0.9 0.95, weight_decay 0.1, clip 1.0 }
  schedule cosine { warmup 30, min_lr_ratio 0.1 }
}
"""


def _compute(text: str, dtype: str) -> str:
    return re.sub(r"dtype \{[^}]*\}", f"dtype {{ params f32, compute {dtype} }}", text)


def train_pair(name: str, text: str, steps: int, batch: int, seq: int, block: int) -> dict:
    """The same model, seed and data in BF16, in FP8 and, as a yardstick for what rounding alone changes along a
    chaotic training trajectory, in FP32. Gaps are relative to BF16, on the last step and on the mean of the last
    50 steps (single steps are noisy)."""
    import dsv3c
    from dsv3c.runtime.data import SyntheticStream
    from dsv3c.runtime.loop import train

    runs = {
        "bf16": (_compute(text, "bf16"), ""),
        "fp8": (_compute(text, "bf16"), f"dsv3-fp8-quant{{block={block}}}"),
        "f32": (_compute(text, "f32"), ""),
    }
    curves, seconds = {}, {}
    for label, (spec_text, pipeline) in runs.items():
        start = time.perf_counter()
        prog = dsv3c.compile(dsv3c.parse(spec_text), mode="train", batch=batch, seq=seq, pipeline=pipeline, steps=steps)
        history = train(prog, steps, SyntheticStream(prog.report["vocab"], 0), seed=0)
        curves[label] = np.array(history.losses())
        seconds[label] = time.perf_counter() - start
        print(f"  {name} {label}: loss {curves[label][0]:.4f} -> {curves[label][-1]:.4f} "
              f"({seconds[label]:.0f} s, {prog.report['params_total']:,} params)", flush=True)
    window = min(50, steps)
    gaps = {}
    for label in ("fp8", "f32"):
        last = (curves[label][-1] - curves["bf16"][-1]) / curves["bf16"][-1]
        mean = (curves[label][-window:].mean() - curves["bf16"][-window:].mean()) / curves["bf16"][-window:].mean()
        gaps[label] = {"last": float(last), f"last{window}": float(mean)}
        print(f"{name}: {label} vs bf16: final loss {curves[label][-1]:.4f} vs {curves['bf16'][-1]:.4f}, relative gap "
              f"{last:+.3%} (mean of the last {window} steps {mean:+.3%})", flush=True)
    return {"curves": {k: v.tolist() for k, v in curves.items()}, "gaps": gaps, "seconds": seconds}


def bench_train(steps: int) -> dict:
    tiny = (ROOT / "examples" / "tiny.dsv3").read_text()
    return {
        "tiny": train_pair("tiny (block 32)", tiny, steps, 16, 64, 32),
        "small": train_pair("small (block 128)", SMALL, steps, 16, 64, 128),
    }


# ---------------------------------------------------------------------------------------------------------------
# (c) memory of the 671B training step
# ---------------------------------------------------------------------------------------------------------------


def bench_memory(target: str) -> dict:
    import dsv3c

    spec = dsv3c.load(ROOT / "examples" / "deepseek-v3-671b.dsv3")
    out = {}
    for label, fp8 in (("bf16", None), ("fp8", "emulate" if target == "cpu" else "native")):
        start = time.perf_counter()
        prog = dsv3c.compile(spec, target=target, mode="train", batch=1, seq=4096, fp8=fp8)
        mem = prog.report["memory_per_device_bytes"]
        out[label] = {"memory": mem, "fp8": prog.report.get("fp8"), "seconds": time.perf_counter() - start}
        gib = {k: v / 2**30 for k, v in mem.items()}
        print(f"671B train step on {target}, batch 1 x 4096, {label}: " + ", ".join(
            f"{k} {v:,.1f} GiB" for k, v in gib.items()) + f" ({out[label]['seconds']:.0f} s to compile)", flush=True)
    for key in ("arguments", "temp", "total"):
        a, b = out["bf16"]["memory"].get(key, 0), out["fp8"]["memory"].get(key, 0)
        if a:
            print(f"  {key}: fp8/bf16 = {b / a:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quant", "train", "memory", "all"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", default="gpu-h100")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args()
    results = {}
    if args.what in ("quant", "all"):
        results["quant"] = bench_quant()
    if args.what in ("train", "all"):
        results["train"] = bench_train(args.steps)
    if args.what in ("memory", "all"):
        results["memory"] = bench_memory(args.target)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
