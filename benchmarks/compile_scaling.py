"""Compile time against depth: DeepSeek-V3 671B with 61 layers vs the same model cut to 8, in one process.

Repeated layers are one `dsv3.layer_stack` op lowered to `lax.scan`, so the XLA program (and its compile time)
should not grow with depth. Prints the times of each stage and the 61/8 ratio; the reference is the 8-layer model.

    python benchmarks/compile_scaling.py [--mode train] [--batch 1] [--seq 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import dsv3c

SPEC = Path(__file__).resolve().parents[1] / "examples" / "deepseek-v3-671b.dsv3"


def compile_seconds(text: str, mode: str, batch: int, seq: int) -> tuple[float, dict[str, float], int]:
    start = time.perf_counter()
    prog = dsv3c.compile(dsv3c.parse(text), mode=mode, batch=batch, seq=seq)
    return time.perf_counter() - start, prog.report["compile_seconds"], len(prog.stablehlo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="train")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    full = SPEC.read_text()
    cut = re.sub(r"layers 61", "layers 8", full)
    results = {}
    for name, text in (("8 layers", cut), ("61 layers", full)):
        runs = [compile_seconds(text, args.mode, args.batch, args.seq) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r[0])
        results[name] = best
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in best[1].items())
        print(f"{name:>9}: {best[0]:6.2f}s total (best of {args.repeats}; {stages}); StableHLO {best[2]:,} chars")
    ratio = results["61 layers"][0] / results["8 layers"][0]
    print(f"61/8 layers compile-time ratio: {ratio:.2f}x (layer count ratio 7.6x)")


if __name__ == "__main__":
    main()
