"""Decode speed and KV-cache size of absorbed (latent cache) vs naive (per-head keys and values) MLA, one process.

DeepSeek-V3's real attention shapes (128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128) on a few dense
layers of a narrower model (`--dim`, default 1024, so the weights of the layers fit a laptop and the attention, not
the feed-forward, dominates), compiled twice from the same spec: the default decode pipeline
(`dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache`) and the naive one (`dsv3-drop-mtp,dsv3-kv-cache`), run on the same
parameters. For each context length the caches are filled with `context` random entries (the values do not change
the cost of a step; prefilling 8192 tokens through naive attention would need a 34 GB score tensor) and single-token
decode steps are timed after a warm-up.

    python benchmarks/decode.py                     # contexts 512, 2048, 8192 on CPU; about 3 minutes on 2 cores
    python benchmarks/decode.py --contexts 512 --steps 4 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv3c  # noqa: E402
from dsv3c.runtime.decode import init_caches  # noqa: E402

ABSORBED = "dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache"
NAIVE = "dsv3-drop-mtp,dsv3-kv-cache"


def spec_text(layers: int, dim: int, dtype: str) -> str:
    return f"""model v3_attention {{
  vocab 1024
  dim {dim}
  layers {layers}
  attention mla {{
    heads 128
    q_lora_rank 1536
    kv_lora_rank 512
    head_dim {{ nope 128, rope 64, v 128 }}
    rope {{ theta 10000, layout interleaved }}
  }}
  ffn dense {{ hidden {dim} }}
  dtype {{ params {dtype}, compute {dtype} }}
}}
"""


def filled_caches(prog: dsv3c.Program, batch: int, context: int, capacity: int, seed: int) -> dict[str, jax.Array]:
    """Caches holding `context` random entries per sequence (positions 0..context-1), room for `capacity`."""
    infos = prog._decoder.caches
    caches = init_caches(infos, batch, capacity)
    key = jax.random.key(seed)
    for name, info in infos.items():
        if name == "positions":
            filled = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
            caches[name] = caches[name].at[:, :context].set(filled)
        else:
            key, sub = jax.random.split(key)
            shape = info.concrete(batch, context)
            caches[name] = caches[name].at[:, :, :context].set(jax.random.normal(sub, shape, info.dtype))
    return caches


def time_decode(prog: dsv3c.Program, params, batch: int, context: int, steps: int, warmup: int) -> float:
    """Seconds per decode step (one new token per sequence) at `context` cached tokens."""
    decoder = prog._decoder
    caches = filled_caches(prog, batch, context, context + warmup + steps, seed=context)
    token = jnp.ones((batch, 1), jnp.int32)
    times = []
    for i in range(warmup + steps):
        positions = jnp.full((batch, 1), context + i, jnp.int32)
        clock = time.perf_counter()
        logits, caches = decoder.step(params, caches, token, positions, context + i)
        logits.block_until_ready()
        times.append(time.perf_counter() - clock)
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    return float(np.median(times[warmup:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    spec = dsv3c.parse(spec_text(args.layers, args.dim, args.dtype))
    print(f"{args.layers} layers, dim {args.dim}, 128 heads, kv_lora 512, rope 64, {args.dtype}, batch {args.batch}, "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores", flush=True)
    rows = []
    params = None
    for context in contexts:
        capacity = context + args.warmup + args.steps
        row = {"context": context}
        for label, pipeline in (("absorbed", ABSORBED), ("naive", NAIVE)):
            prog = dsv3c.compile(spec, mode="decode", batch=args.batch, seq=capacity, pipeline=pipeline)
            params = params if params is not None else prog.init_params(seed=0)
            seconds = time_decode(prog, params, args.batch, context, args.steps, args.warmup)
            row[label] = {
                "tokens_per_s": args.batch / seconds, "ms_per_step": 1e3 * seconds,
                "kv_cache_bytes_per_token": prog.report["kv_cache_bytes_per_token"],
            }
        row["speedup"] = row["absorbed"]["tokens_per_s"] / row["naive"]["tokens_per_s"]
        row["cache_ratio"] = row["naive"]["kv_cache_bytes_per_token"] / row["absorbed"]["kv_cache_bytes_per_token"]
        rows.append(row)
        a, n = row["absorbed"], row["naive"]
        print(f"context {context:5d}: absorbed {a['tokens_per_s']:7.2f} tok/s ({a['ms_per_step']:7.1f} ms/step, "
              f"{a['kv_cache_bytes_per_token']:,} B/token)  naive {n['tokens_per_s']:7.2f} tok/s "
              f"({n['ms_per_step']:7.1f} ms/step, {n['kv_cache_bytes_per_token']:,} B/token)  "
              f"absorbed/naive speed {row['speedup']:.2f}x, cache {row['cache_ratio']:.0f}x smaller", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
