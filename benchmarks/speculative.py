"""MTP speculative decoding on a trained model: draft acceptance rate, and speed against plain greedy decoding.

Trains `examples/tiny.dsv3` (with its MTP module) on the synthetic stream, whose next token is a fixed function of
the previous two, so the MTP module can learn to predict two tokens ahead. Then greedy decoding with and without the
MTP draft (`-p dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache`, `generate(..., speculative=True)`) from unseen
prompts of that stream: the tokens must be identical; the report is the fraction of drafts the main model accepted
and the wall time of each.

    python benchmarks/speculative.py               # 300 training steps, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import dsv3c  # noqa: E402
from dsv3c.runtime.data import SyntheticStream  # noqa: E402
from dsv3c.runtime.loop import train  # noqa: E402
from dsv3c.runtime.params_io import load_params  # noqa: E402

SPEC = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny.dsv3")
PIPELINE = "dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()

    trainer = dsv3c.compile(SPEC, mode="train", batch=16, seq=64, steps=args.steps)
    data = SyntheticStream(trainer.report["vocab"], seed=0)
    with tempfile.TemporaryDirectory() as ckpt:
        clock = time.perf_counter()
        log = train(trainer, args.steps, data, ckpt=ckpt, save_every=args.steps, log_every=args.steps)
        last = log.metrics[-1]
        print(f"trained {args.steps} steps in {time.perf_counter() - clock:.0f}s: lm loss {last['lm_loss']:.3f}, "
              f"mtp loss {last['mtp_loss']:.3f}")
        prog = dsv3c.compile(SPEC, mode="decode", batch=args.prompts, seq=args.prompt_len + args.new, pipeline=PIPELINE)
        params = load_params(ckpt, prog.infos)

    prompts = data.batch(10**6, args.prompts, args.prompt_len)  # a batch training never saw
    results = {}
    for label, speculative in (("greedy", False), ("speculative", True)):
        prog.generate(params, prompts, args.new, speculative=speculative)  # compile
        clock = time.perf_counter()
        out = prog.generate(params, prompts, args.new, speculative=speculative)
        results[label] = (out, time.perf_counter() - clock)
    plain, plain_s = results["greedy"]
    spec, spec_s = results["speculative"]
    assert np.array_equal(plain, spec.tokens), "speculative decoding must give the greedy tokens"
    truth = np.concatenate([prompts, plain], axis=1)
    rule_ok = np.mean([
        data.perm[(truth[b, i - 1] + data.shift[truth[b, i - 2]]) % data.vocab] == truth[b, i]
        for b in range(truth.shape[0]) for i in range(args.prompt_len, truth.shape[1])
    ])
    steps = spec.drafts_checked / args.prompts
    print(f"{args.prompts} prompts x {args.new} new tokens: identical tokens with and without the draft; "
          f"{rule_ok:.1%} of generated tokens follow the stream's rule")
    print(f"MTP draft acceptance {spec.acceptance_rate:.1%} ({spec.drafts_accepted}/{spec.drafts_checked}); "
          f"{args.new / (1 + steps):.2f} tokens per main-model step on average "
          f"(~{steps:.0f} verify steps per sequence instead of {args.new - 1})")
    print(f"wall: greedy {plain_s:.2f}s ({plain.size / plain_s:.0f} tok/s), speculative {spec_s:.2f}s "
          f"({plain.size / spec_s:.0f} tok/s), {plain_s / spec_s:.2f}x")


if __name__ == "__main__":
    main()
