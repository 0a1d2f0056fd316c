"""Compiled memory of a train step under each recompute policy of `dsv3-remat`.

MaxText's `deepseek3-test` (DeepSeek-V3's layer structure at width 512: 128 heads, q_lora 1536, kv_lora 512) cut
to a few layers (by default all dense: on CPU and GPU, XLA lowers the MoE layers' grouped GEMM densely, and its
temporaries would hide the activations), compiled from shapes alone once per policy in one process. Prints XLA's
temporary memory (where the activations kept for the backward pass live), its ratio to `none`, and the host memory
the offload policy uses (reported by the TPU and GPU compilers; XLA:CPU has one memory, where offloading is a no-op).

    python benchmarks/remat.py [--layers 4] [--dense-first N] [--batch 1] [--seq 2048] [--target cpu|gpu|tpu-v5e-1]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import dsv3c

SPEC = Path(__file__).resolve().parents[1] / "examples" / "deepseek3-test.dsv3"

POLICIES = {
    "none": "dsv3-remat{policy=none}",
    "outputs": "dsv3-remat{policy=outputs}",
    "deepseek": "dsv3-remat{policy=deepseek}",
    "full": "dsv3-remat{policy=full}",
    "deepseek + offload attn": "dsv3-remat{policy=deepseek offload=attn}",
}


def cut(text: str, layers: int, dense_first: int) -> str:
    """The spec with `layers` layers, the first `dense_first` dense (all dense: the MoE block goes)."""
    text = re.sub(r"layers 61 \{ dense_first 3 \}", f"layers {layers} {{ dense_first {dense_first} }}", text)
    if dense_first >= layers:
        text = re.sub(r"\n  ffn moe \{.*?\n  \}", "", text, flags=re.S)
    return text


def measure(spec: dsv3c.ModelSpec, pipeline: str, args: argparse.Namespace) -> dict[str, float]:
    """Temp and host-temp bytes of the compiled train step, and the wall time of the compile."""
    start = time.perf_counter()
    prog = dsv3c.compile(spec, target=args.target, mode="train", batch=args.batch, seq=args.seq, pipeline=pipeline)
    seconds = time.perf_counter() - start
    host = 0.0
    if "offload" in pipeline and args.target != "cpu":
        host = float(prog.lower().compile().memory_analysis().host_temp_size_in_bytes)
    return {"temp": float(prog.report["memory_per_device_bytes"]["temp"]), "host": host, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dense-first", type=int, default=None, help="dense layers first (default: all)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--target", default="cpu")
    args = parser.parse_args()
    if args.dense_first is None:
        args.dense_first = args.layers
    spec = dsv3c.parse(cut(SPEC.read_text(), args.layers, args.dense_first))
    rows = {name: measure(spec, pipeline, args) for name, pipeline in POLICIES.items()}
    mib = 2.0**20
    print(f"deepseek3-test, {args.layers} layers ({args.dense_first} dense), {args.target}, train step batch "
          f"{args.batch} seq {args.seq}")
    print("| policy | pipeline | temp MiB | temp / none | host temp MiB | compile s |")
    print("|---|---|---|---|---|---|")
    none = rows["none"]["temp"]
    for name, row in rows.items():
        print(f"| {name} | `{POLICIES[name]}` | {row['temp'] / mib:,.1f} | {row['temp'] / none:.2f} | "
              f"{row['host'] / mib:,.1f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
