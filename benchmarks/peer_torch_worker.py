"""The PyTorch side of `benchmarks/peer_torch.py`: Hugging Face transformers' `DeepseekV3ForCausalLM` in eager mode.

It runs in the benchmark's own virtual environment (torch and transformers are not dsv3c dependencies, and dsv3c's
JAX is not needed here), one subprocess per measurement, and prints one JSON object as its last line of stdout. Why
a subprocess per measurement: each row starts from the same clean process state, and the peak-RSS row needs a
fresh process anyway.

    python peer_torch_worker.py build --dir D --config '{...}' --seed 0      # random model -> D (safetensors)
    python peer_torch_worker.py bench --dir D --row forward --dtype f32 --reps 3 --threads 2
    python peer_torch_worker.py bench --dir D --row train --serve             # one timed call per `call` line
    python peer_torch_worker.py rss --dir D --threads 2                       # peak RSS of 3 f32 train steps

`--serve` is how the driver alternates the two frameworks' timed calls: after its warm-up the worker prints
`{"ready": true}`, then times one call for each `call` line on stdin (printing its wall seconds) until `done`, and
then prints its result as `bench` does.

Inputs (token arrays) are `.npy` files that the driver writes into D, so both sides see exactly the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from timing import time_calls  # benchmarks/timing.py, beside this script
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

# Decode warms up on a short generation: the same prefill and cached-step code paths as the timed 128-token calls,
# without paying for a whole extra generation (up to a minute for bf16 batch 8 on 2 cores).
WARMUP_NEW_TOKENS = 8


def emit(result: dict[str, Any]) -> None:
    """The one machine-readable line the driver reads (anything transformers logs goes before it or to stderr)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def environment(model: DeepseekV3ForCausalLM | None = None) -> dict[str, Any]:
    """What decides torch's speed on a shared CPU: versions, thread pools, and the kernels transformers picked."""
    env: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if model is not None:
        env["attn_implementation"] = model.config._attn_implementation
        env["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return env


def set_threads(threads: int) -> None:
    """Intra-op threads = the cores given (torch's default may differ under a container's CPU quota)."""
    torch.set_num_threads(threads)


def randomise(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Norm weights away from 1 and a nonzero router correction bias (as tests/fixtures/make_hf_fixture.py does), so
    that the parity check would catch a swapped or ignored tensor, and routing is not a near-tie everywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * (torch.rand(b.shape, generator=gen) - 0.5))


def load(directory: Path, dtype: str, attn: str | None, experts: str | None) -> DeepseekV3ForCausalLM:
    """The saved model, in f32 or cast to bf16 as a whole (`model.to(torch.bfloat16)`, the usual way to run bf16)."""
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    if experts:
        kwargs["experts_implementation"] = experts
    model = DeepseekV3ForCausalLM.from_pretrained(directory, **kwargs)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model


def build(args: argparse.Namespace) -> None:
    """Builds the seeded random model, saves it with `save_pretrained` (safetensors), and writes the f32 reference
    logits of the parity tokens the driver left in the directory."""
    directory = Path(args.dir)
    cfg = DeepseekV3Config(**json.loads(args.config))
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM._from_config(cfg, dtype=torch.float32).eval()
    randomise(model, args.seed)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "generation_config.json").unlink(missing_ok=True)  # greedy/eos settings come from the call
    tokens = torch.as_tensor(np.load(directory / "parity_tokens.npy"), dtype=torch.long)
    with torch.inference_mode():
        logits = model(tokens).logits.float().numpy()
    np.save(directory / "parity_logits_torch.npy", logits)
    total = sum(p.numel() for p in model.parameters())
    emit({"params": total, "env": environment(model)})


def forward_fn(model: DeepseekV3ForCausalLM, tokens: torch.Tensor):
    """One full forward pass (logits of every position, as dsv3c's `Program.forward` returns)."""

    def run() -> None:
        with torch.inference_mode():
            model(tokens)

    return run


def train_fn(model: DeepseekV3ForCausalLM, tokens: torch.Tensor):
    """One optimizer step: next-token cross-entropy over [B, S] inputs and their [B, S] labels (the driver's
    int32[B, S+1] batch, as dsv3c reads it), backward, gradient clipping at 1.0 and AdamW with the hyperparameters
    of dsv3c's default optimizer (lr 2.2e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2.2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    vocab = model.config.vocab_size
    losses: list[float] = []

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), labels.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    run.losses = losses  # type: ignore[attr-defined]
    return run


def decode_fn(model: DeepseekV3ForCausalLM, prompts: torch.Tensor, new_tokens: int):
    """Greedy `generate` with the KV cache, exactly `new_tokens` new tokens (no EOS, so no early stop). The tokens
    of the last call are kept on the function (`run.tokens`) for the driver to compare with dsv3c's."""
    mask = torch.ones_like(prompts)

    def generate(count: int) -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                prompts, attention_mask=mask, do_sample=False, max_new_tokens=count, min_new_tokens=count,
                use_cache=True, pad_token_id=0, eos_token_id=None,
            )
        assert out.shape[1] == prompts.shape[1] + count, out.shape
        return out[:, prompts.shape[1]:].numpy().astype(np.int32)

    def run() -> None:
        run.tokens = generate(new_tokens)  # type: ignore[attr-defined]

    return run, lambda: generate(WARMUP_NEW_TOKENS)


def warm_up(run, warmup=None) -> float:
    """Seconds of the warm-up call (`run` itself unless a cheaper call on the same code paths is given), which pays
    for lazy initialisation and allocator growth and is left out of the median."""
    clock = time.perf_counter()
    (warmup or run)()
    return time.perf_counter() - clock


def served_calls(run) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of one call per `call` line on stdin, until any other line."""
    emit({"ready": True})
    times: list[float] = []
    cpu: list[float] = []
    for line in sys.stdin:
        if line.strip() != "call":
            break
        wall, used = time_calls(run, 1, 0.0)
        times += wall
        cpu += used
        emit({"wall_s": wall[0]})
    return times, cpu


def bench(args: argparse.Namespace) -> None:
    """Times one row on one dtype and reports tokens/s from the median of the timed calls."""
    set_threads(args.threads)
    directory = Path(args.dir)
    model = load(directory, args.dtype, args.attn, args.experts).eval()
    tokens = torch.as_tensor(np.load(directory / args.tokens), dtype=torch.long)
    warmup = None
    if args.row == "forward":
        run, counted = forward_fn(model, tokens), tokens.numel()
    elif args.row == "train":
        run, counted = train_fn(model, tokens), tokens[:, :-1].numel()
    else:
        run, warmup = decode_fn(model, tokens, args.new_tokens)
        counted = tokens.shape[0] * args.new_tokens
    first = warm_up(run, warmup)
    times, cpu = served_calls(run) if args.serve else time_calls(run, args.reps, args.budget)
    median = statistics.median(times)
    result: dict[str, Any] = {
        "tokens_per_s": counted / median, "median_s": median, "times_s": times, "first_s": first,
        "cpu_s": cpu, "median_cpu_s": statistics.median(cpu), "tokens_counted": counted, "env": environment(model),
    }
    if hasattr(run, "losses"):
        result["losses"] = run.losses
    if hasattr(run, "tokens"):
        np.save(directory / f"generated_{args.dtype}_{tokens.shape[0]}.npy", run.tokens)
        result["warmup_new_tokens"] = WARMUP_NEW_TOKENS
    emit(result)


def peak_rss_mib() -> tuple[float, float]:
    """(ru_maxrss, VmHWM) in MiB. ru_maxrss survives fork and exec, so a child of a big process reports at least
    its parent's peak; VmHWM is this process image's own high-water mark, the cross-check."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm / 1024


def rss(args: argparse.Namespace) -> None:
    """Peak resident memory of this fresh process after loading the f32 model and taking 3 train steps."""
    set_threads(args.threads)
    directory = Path(args.dir)
    model = load(directory, "f32", args.attn, args.experts)
    tokens = torch.as_tensor(np.load(directory / args.tokens), dtype=torch.long)
    run = train_fn(model, tokens)
    for _ in range(3):
        run()
    peak, hwm = peak_rss_mib()
    emit({"peak_rss_mib": peak, "vm_hwm_mib": hwm, "losses": run.losses, "env": environment(model)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dir", required=True)
    b.add_argument("--config", required=True, help="DeepseekV3Config keyword arguments as JSON")
    b.add_argument("--seed", type=int, default=0)
    for name in ("bench", "rss"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--tokens", required=True, help=".npy file in --dir")
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        p.add_argument("--attn", default=None, help="attn_implementation (default: transformers' choice)")
        p.add_argument("--experts", default=None, help="experts_implementation (default: transformers' choice)")
        if name == "bench":
            p.add_argument("--row", choices=["forward", "train", "decode"], required=True)
            p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
            p.add_argument("--reps", type=int, default=3)
            p.add_argument("--budget", type=float, default=45.0, help="stop timing once the calls add up to this")
            p.add_argument("--new-tokens", type=int, default=128)
            p.add_argument("--serve", action="store_true", help="time one call per `call` line on stdin")
    args = parser.parse_args()
    {"build": build, "bench": bench, "rss": rss}[args.cmd](args)


if __name__ == "__main__":
    main()
