"""deepseek3-test on tpu-v5p-8 (batch 4, seq 2048), ahead of time: dsv3c's memory per device beside MaxText's, in one
run on this host (REFERENCE.md sections 7 and 9).

    python benchmarks/tpu_memory_table.py [--rows fsdp4,fsdp2tp2,fsdp4-grads-f32] [--maxtext TOOL]

Each dsv3c row is `dsv3c compile examples/deepseek3-test.dsv3 --target tpu-v5p-8 --mesh MESH --batch 4 --seq 2048
[-p PIPELINE] [--shard-mode explicit] --report R` in a fresh process (`-grads-f32` rows compile the spec with
`train { optimizer adamw { grads f32 } }` added: weight gradients widened as they are produced, as before `grads
compute`); each MaxText row is its own `train_compile` through the shared tool (MaxText's default `remat_policy:
full`; `-explicit` rows in its explicit shard mode). Prints a markdown table with temp ratios, ready for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

ROWS = {
    # name: (mesh, pipeline or None for the target's default, MaxText row it is compared with)
    "fsdp4": ("fsdp=4", None, "fsdp4"),
    "fsdp4-grads-f32": ("fsdp=4", None, "fsdp4"),
    "fsdp4-deepseek": ("fsdp=4", "dsv3-remat{policy=deepseek}", "fsdp4"),
    "fsdp2tp2": ("fsdp=2,tensor=2", None, "fsdp2tp2"),
    "fsdp2tt2": ("fsdp=2,tensor_transpose=2", None, "fsdp2tt2"),
    "fsdp4-explicit": ("fsdp=4", None, "fsdp4-explicit"),
    "fsdp2tp2-explicit": ("fsdp=2,tensor=2", None, "fsdp2tp2-explicit"),
    "fsdp2tt2-explicit": ("fsdp=2,tensor_transpose=2", None, "fsdp2tt2"),
}
MAXTEXT = {
    "fsdp4": ["ici_fsdp_parallelism=4"],
    "fsdp2tp2": ["ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"],
}
MAXTEXT["fsdp4-explicit"] = MAXTEXT["fsdp4"]
MAXTEXT["fsdp2tp2-explicit"] = MAXTEXT["fsdp2tp2"]
RECORDED = {
    # MaxText 0.2.5 has no tensor_transpose axis; REFERENCE.md section 7 records MaxText 0.2.3's (jax 0.10.2) compile
    "fsdp2tt2": {"arguments": 45_413, "temp": 46_770, "total": 92_183, "wall": float("nan")},
}
SPEC = ROOT / "examples/deepseek3-test.dsv3"
GRADS_F32 = "\ntrain { optimizer adamw { grads f32 } }\n"


def dsv3c_row(mesh: str, pipeline: str | None, grads_f32: bool, explicit: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report, spec = Path(tmp) / "r.json", SPEC
        if grads_f32:
            spec = Path(tmp) / SPEC.name
            spec.write_text(SPEC.read_text() + GRADS_F32)
        command = [sys.executable, "-m", "dsv3c", "compile", str(spec),
                   "--target", "tpu-v5p-8", "--mesh", mesh, "--batch", "4", "--seq", "2048", "--report", str(report)]
        if pipeline:
            command += ["-p", pipeline]
        if explicit:
            command += ["--shard-mode", "explicit"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        memory = json.loads(report.read_text())["memory_per_device_bytes"]
    return {"arguments": memory["arguments"] / MiB, "temp": memory["temp"] / MiB, "total": memory["total"] / MiB,
            "wall": time.perf_counter() - start}


def maxtext_row(tool: str, name: str) -> dict:
    mode = "explicit" if name.endswith("-explicit") else "auto"
    out = subprocess.run(["bash", tool, name, mode, *MAXTEXT[name]], capture_output=True, text=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in line:  # MaxText's explicit mode fails for FSDP2+TP2 (REFERENCE.md section 7)
        nan = float("nan")
        return {"arguments": nan, "temp": nan, "total": nan, "wall": nan, "error": line["error"][:80]}
    return {"arguments": line["arguments_MiB"], "temp": line["temp_MiB"], "total": line["peak_MiB"],
            "wall": line["compile_wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--maxtext", default=str(ROOT.parent / "shared/tools/maxtext-aot.sh"))
    parser.add_argument("--skip-maxtext", action="store_true",
                        help="dsv3c's rows only (MaxText's columns nan): to re-measure dsv3c against an earlier anchor")
    args = parser.parse_args()
    names = args.rows.split(",")
    anchors = {}
    for name in dict.fromkeys(ROWS[n][2] for n in names):
        if args.skip_maxtext and name not in RECORDED:
            anchors[name] = {"arguments": math.nan, "temp": math.nan, "total": math.nan, "wall": math.nan}
            continue
        print(f"MaxText {name} ...", file=sys.stderr, flush=True)
        anchors[name] = RECORDED[name] if name in RECORDED else maxtext_row(args.maxtext, name)
    print("| mesh | mode, dsv3c pipeline, grads | dsv3c temp | dsv3c total | MaxText temp | MaxText total "
          "| temp ratio | dsv3c / MaxText compile |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        mesh, pipeline, anchor = ROWS[name]
        print(f"dsv3c {name} ...", file=sys.stderr, flush=True)
        grads_f32, explicit = name.endswith("-grads-f32"), name.endswith("-explicit")
        ours, theirs = dsv3c_row(mesh, pipeline, grads_f32, explicit), anchors[anchor]
        ratio = ours["temp"] / theirs["temp"]
        setting = f"{'explicit' if explicit else 'auto'}, {pipeline or 'default'}, {'f32' if grads_f32 else 'compute'}"
        print(f"| {mesh} | {setting} | {ours['temp']:,.0f} | {ours['total']:,.0f} "
              f"| {theirs['temp']:,.0f} | {theirs['total']:,.0f} | **{ratio:.2f}x** "
              f"| {ours['wall']:.0f} s / {theirs['wall']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
