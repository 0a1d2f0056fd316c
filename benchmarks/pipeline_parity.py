"""Every pipeline schedule against the unpipelined step, on eight simulated CPU devices: loss and gradients.

    python benchmarks/pipeline_parity.py [--schedules gpipe,1f1b,...] [--cases pipe=2;pipe=2,fsdp=2;...]
    python benchmarks/pipeline_parity.py --train 50 --schedules 1f1b --cases pipe=2

For each schedule and mesh, compiles the pipelined `loss_and_grads` and compares it, on one state and batch, with the
unpipelined step of the same model: `tiny` for pipe=2, `tiny` with 8 layers for pipe=4 (the two-chunk schedules need
8 chunks). Prints a row per case (the largest gradient error relative to that gradient's largest entry, the loss
difference, the tables' ticks and bubble, compile seconds) and a last line with the worst error. The suite runs the
DualPipeV row (`tests/test_pipeline_lowering.py`); this is the whole matrix, a few minutes per row on two cores.

`--train STEPS` trains instead: the pipelined and the unpipelined step from the same state over the same synthetic
batches (seq 32, at a learning rate of 1e-3), and prints the largest relative difference of their losses over the
run (they agree to 2e-6 at every step of 50 for 1F1B at pipe=2; at `tiny`'s own 1e-2 they agree for about 15
steps, until a router's top-k choice between two nearly equal experts flips, then drift by up to 1%, as any two
orders of float additions would).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv3c  # noqa: E402
from dsv3c.runtime.data import SyntheticStream  # noqa: E402
from dsv3c.runtime.loop import train as train_loop  # noqa: E402
from dsv3c.runtime.pipeline_ticks import build_tables  # noqa: E402
from dsv3c.runtime.stages import stage_layout  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb", "dualpipev")
CASES = ("pipe=2", "pipe=2,fsdp=2", "pipe=4", "pipe=4,expert=2")
SEQ = 16
TRAIN_SEQ = 32


def spec_for(ranks: int, lr: str = "1e-2") -> dsv3c.ModelSpec:
    text = open("examples/tiny.dsv3").read().replace("lr 1e-2", f"lr {lr}")
    if ranks > 2:
        text = text.replace("layers 4 { dense_first 1 }", "layers 8 { dense_first 1 }")
    return dsv3c.parse(text)


def parse_case(case: str) -> tuple[dict[str, int], int, int]:
    """A case's mesh, its pipe ranks, and its batch: four sequences per rank and per data-parallel way."""
    mesh = {k: int(v) for k, v in (item.split("=") for item in case.split(","))}
    return mesh, mesh["pipe"], 4 * mesh["pipe"] * max(mesh.get("fsdp", 1), mesh.get("expert", 1))


def losses(prog: dsv3c.Program, steps: int) -> np.ndarray:
    """The loss of each of `steps` training steps from seed 0's state over the same synthetic batches."""
    return np.array(train_loop(prog, steps, SyntheticStream(256, seed=2)).losses())


def train(args: argparse.Namespace) -> None:
    """The pipelined training runs against the unpipelined one (`--train`)."""
    print(f"{'schedule':12} {'mesh':16} {'steps':>5} {'max rel loss diff':>17} {'first loss':>10} {'last loss':>9}")
    worst = 0.0
    for case in args.cases.split(";"):
        mesh, ranks, batch = parse_case(case)
        spec = spec_for(ranks, lr="1e-3")
        plain = losses(dsv3c.prepare(spec, batch=batch, seq=TRAIN_SEQ, steps=args.train), args.train)
        for schedule in args.schedules.split(","):
            cut = f"ranks={ranks} schedule={schedule} microbatches={2 * ranks} seq={TRAIN_SEQ}"
            prog = dsv3c.prepare(spec, batch=batch, seq=TRAIN_SEQ, steps=args.train, mesh=mesh,
                                 pipeline=f"dsv3-remat,dsv3-pipeline{{{cut}}}", devices=int(np.prod([*mesh.values()])))
            piped = losses(prog, args.train)
            diff = float(np.max(np.abs(piped - plain) / np.abs(plain)))
            worst = max(worst, diff)
            print(f"{schedule:12} {case:16} {args.train:5d} {diff:17.2e} {piped[0]:10.4f} {piped[-1]:9.4f}", flush=True)
    print(f"worst relative loss difference: {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--cases", default=";".join(CASES))
    parser.add_argument("--train", type=int, default=0, help="train this many steps instead of comparing gradients")
    args = parser.parse_args()
    if args.train:
        train(args)
        return
    references: dict[int, tuple] = {}
    worst = 0.0
    print(f"{'schedule':12} {'mesh':16} {'grad err':>9} {'loss diff':>9} {'ticks':>5} {'bubble':>6} {'compile s':>9}")
    for case in args.cases.split(";"):
        mesh, ranks, batch = parse_case(case)
        if ranks not in references:
            plain = dsv3c.prepare(spec_for(ranks), batch=batch, seq=SEQ)
            state = plain.init_state(0)
            tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, SEQ + 1), 0, 256)
            references[ranks] = (batch, tokens, *plain.loss_and_grads(state, {"tokens": tokens}))
        batch, tokens, expected, expected_grads = references[ranks]
        for schedule in args.schedules.split(","):
            microbatches = 2 * ranks
            cut = f"ranks={ranks} schedule={schedule} microbatches={microbatches} seq={SEQ}"
            clock = time.perf_counter()
            prog = dsv3c.prepare(spec_for(ranks), batch=batch, seq=SEQ, mesh=mesh,
                                 pipeline=f"dsv3-remat,dsv3-pipeline{{{cut}}}", devices=int(np.prod([*mesh.values()])))
            layout = stage_layout(prog.module)
            metrics, grads = prog.loss_and_grads(prog.init_state(0), {"tokens": tokens})
            grads = layout.unstage_params(grads)
            seconds = time.perf_counter() - clock
            err = max(float(jnp.max(jnp.abs(grads[n] - g)) / (float(jnp.max(jnp.abs(g))) or 1.0))
                      for n, g in expected_grads.items())
            loss = abs(float(metrics["loss"]) - float(expected["loss"]))
            tables = build_tables(layout.schedule)
            worst = max(worst, err)
            print(f"{schedule:12} {case:16} {err:9.2e} {loss:9.2e} {tables.ticks:5d} {float(tables.bubble):6.1f} "
                  f"{seconds:9.0f}", flush=True)
    print(f"worst gradient error: {worst:.2e}")


if __name__ == "__main__":
    main()
