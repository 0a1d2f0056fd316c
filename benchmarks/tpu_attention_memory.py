"""Per-device memory of the MLA attention core, plain vs splash attention, compiled ahead of time for a TPU slice.

    python benchmarks/tpu_attention_memory.py [--target tpu-v5p-8] [--batch 4] [--seq 2048] [--heads 128]

Compiles forward + backward (a VJP: the inputs' gradients from an output cotangent) of the attention core alone at
deepseek3-test's shapes (bfloat16; nope 128, rope 64, value 128 per head), batch split over an `fsdp` axis of every
chip, in two forms: the plain core (`lower.attention.mla_attention`, auto-sharded; it keeps float32 [B, H, S, S]
scores) and `kernels.splash.sharded_splash_attention` (Pallas splash attention under shard_map). Prints XLA's
memory analysis per device: temporaries, arguments, outputs. Needs libtpu; no TPU.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices come from a topology description, not a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from dsv3c.runtime.kernels.splash import sharded_splash_attention  # noqa: E402
from dsv3c.runtime.lower.attention import mla_attention  # noqa: E402
from dsv3c.runtime.xla import compile_lowered  # noqa: E402
from dsv3c.targets import resolve_target  # noqa: E402

NOPE, ROPE, VALUE = 128, 64, 128
GIB = 2**30


def forward_backward(attention):
    """(q_nope, q_pe, k_nope, k_pe, v, cotangent) -> the five inputs' gradients: what a training step runs."""

    def step(q_nope, q_pe, k_nope, k_pe, v, cotangent):
        _, vjp = jax.vjp(attention, q_nope, q_pe, k_nope, k_pe, v)
        return vjp(cotangent)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tpu-v5p-8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=128)
    args = parser.parse_args()

    target = resolve_target(args.target)
    devices = target.devices(target.chips)
    mesh = Mesh(devices, ("fsdp",))
    b, s, h = args.batch, args.seq, args.heads
    scale = (NOPE + ROPE) ** -0.5
    per_head, rope_key = PartitionSpec("fsdp", None, None, None), PartitionSpec("fsdp", None, None)
    shapes = [((b, s, h, NOPE), per_head), ((b, s, h, ROPE), per_head), ((b, s, h, NOPE), per_head),
              ((b, s, ROPE), rope_key), ((b, s, h, VALUE), per_head), ((b, s, h, VALUE), per_head)]
    operands = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for shape, spec in shapes]
    forms = {
        "plain": lambda *x: mla_attention(*x, scale),
        "splash": lambda *x: sharded_splash_attention(*x, scale, mesh, ("fsdp",), None),
    }
    print(f"{args.target} ({len(devices)} chips), batch {b} over fsdp={len(devices)}, seq {s}, {h} heads, bf16; "
          "attention forward + backward, per device:")
    for name, attention in forms.items():
        lowered = jax.jit(forward_backward(attention)).lower(*operands)
        compiled, text = compile_lowered(lowered, {}, "tpu")
        mem = compiled.memory_analysis()
        kernels = text.count('custom_call_target="tpu_custom_call"')
        print(f"  {name:>6}: temp {mem.temp_size_in_bytes / GIB:6.3f} GiB, arguments "
              f"{mem.argument_size_in_bytes / GIB:.3f} GiB, outputs {mem.output_size_in_bytes / GIB:.3f} GiB, "
              f"{kernels} Pallas kernel call(s)")


if __name__ == "__main__":
    main()
