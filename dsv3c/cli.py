"""The `dsv3c` command: compile, opt, train.

Exit codes: 0 success, 2 a user error (printed `PATH:LINE:COL: error: ...` or `dsv3c: error: ...`, never a
traceback), 1 an internal error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .frontend.errors import SpecError, UserError
from .frontend.limits import MAX_IR_BYTES
from .frontend.source import read_source


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad options as a dsv3c user error (exit 2) instead of its own format."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _parse_mesh(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    mesh: dict[str, int] = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise UserError(f"--mesh: expected AXIS=N[,AXIS=N...], got '{item}'")
        mesh[name.strip()] = int(size)
    return mesh


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prepare_platform(args: argparse.Namespace) -> None:
    """Settings JAX reads when its backends start, so before anything runs: simulated CPU devices, the CPU platform
    for ahead-of-time targets (their devices come from topology descriptions), and the distributed runtime."""
    devices = getattr(args, "devices", None)
    if devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if args.target != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if getattr(args, "coordinator", None):
        import jax

        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def _cmd_compile(args: argparse.Namespace) -> int:
    from .program import compile, write_dumps

    _prepare_platform(args)
    pipeline = "" if args.no_passes else (args.pipeline or "default")
    prog = compile(
        args.input, target=args.target, mode=args.mode, batch=args.batch, seq=args.seq,
        mesh=_parse_mesh(args.mesh), shard_mode=args.shard_mode, pipeline=pipeline, log=_log,
        devices=args.devices, rules=args.rules, fp8=args.fp8,
    )
    if args.dump_ir:
        paths = write_dumps(prog.dumps, args.dump_ir)
        _log(f"wrote {len(paths)} dumps to {args.dump_ir}")
    if args.report:
        _write_atomic(Path(args.report), json.dumps(prog.report, indent=1) + "\n")
        _log(f"wrote report to {args.report}")
    r = prog.report
    mem = r["memory_per_device_bytes"].get("total", 0)
    print(
        f"{r['target']} {r['mode']} batch {r['batch']} seq {r['seq']}: {_count(r['params_total'])} params "
        f"({_count(r['params_active_per_token'])} active/token, MTP {_count(r['params_mtp'])}), "
        f"{r['flops_per_step']:.3e} FLOPs/step, {mem / 2**30:.2f} GiB/device"
    )
    return 0


def _count(n: int) -> str:
    """A parameter count in the unit people quote: 671.026B, 15.9M, 289.1K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def _cmd_opt(args: argparse.Namespace) -> int:
    from .dialects.text import parse_ir_with_positions, print_ir
    from .pipeline import run_pipeline

    path = Path(args.input)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.suffix == ".dsv3":
        raise UserError(f"opt reads dsv3 IR (.mlir), not a spec: `dsv3c compile {path} --dump-ir DIR` writes its IR")
    module, positions = parse_ir_with_positions(read_source(path, "IR file", MAX_IR_BYTES), str(path))

    def locate(err: Exception) -> SpecError:
        return SpecError(str(err), str(path), *positions.get(id(getattr(err, "op", None)), (0, 0)))

    dumps = run_pipeline(module, args.pipeline or "", locate)
    if args.print_between_passes:
        for name, text in dumps:
            print(f"// -----// IR after {name} //----- //\n{text}")
    else:
        print(print_ir(module), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .program import compile
    from .runtime.data import SyntheticStream, TokenFile
    from .runtime.loop import load_balance, train

    _prepare_platform(args)
    prog = compile(
        args.input, target=args.target, mode="train", batch=args.batch, seq=args.seq, steps=args.steps, log=_log,
        mesh=_parse_mesh(args.mesh), shard_mode=args.shard_mode, devices=args.devices, rules=args.rules,
        fp8=args.fp8,
    )
    vocab = prog.report["vocab"]
    data = TokenFile(args.data, vocab, args.seed) if args.data else SyntheticStream(vocab, args.seed)
    history = train(
        prog, args.steps, data, seed=args.seed, ckpt=args.ckpt, resume=args.resume,
        save_every=args.save_every, log_every=args.log_every, log=print, metrics_path=args.metrics,
    )
    if history.metrics:
        first, last = history.metrics[0]["loss"], history.metrics[-1]["loss"]
        line = f"done: loss {first:.4f} -> {last:.4f} over steps {history.steps[0]}..{history.steps[-1]}"
        if history.expert_load is not None:
            balance = ", ".join(f"{x:.2f}" for x in load_balance(history.expert_load))
            line += f"; expert load max/mean per MoE layer {balance}"
        print(line)
    return 0


def _parse_prompts(text: str) -> list[list[int]]:
    """`1,2,3` is one prompt; `1,2,3;4,5` two (of any lengths, generated as one batch)."""
    try:
        prompts = [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";")]
    except ValueError:
        message = f"--prompt-ids: expected comma-separated token ids (';' between prompts), got '{text}'"
        raise UserError(message) from None
    if not prompts or any(not p for p in prompts):
        raise UserError("--prompt-ids: every prompt needs at least one token id")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from .program import compile
    from .runtime.hf_import import import_hf
    from .runtime.params_io import load_params

    if bool(args.hf) == bool(args.input or args.ckpt) or (args.input and not args.ckpt):
        raise UserError("generate takes either INPUT --ckpt DIR or --hf DIR")
    prompts = _parse_prompts(args.prompt_ids)
    params = None
    source = args.input
    if args.hf:
        source, params = import_hf(args.hf, dtype=args.dtype)
        _log(f"imported {args.hf}")
    default = "dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache" if args.speculative else "default"
    pipeline = "" if args.no_passes else (args.pipeline or default)
    prog = compile(source, mode="decode", batch=len(prompts), seq=max(map(len, prompts)) + args.max_new,
                   pipeline=pipeline, log=_log)
    if params is None:
        params = load_params(args.ckpt, prog.infos)
    vocab = prog.report["vocab"]
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise UserError(f"--prompt-ids: token ids must be in [0, {vocab})")
    clock = time.perf_counter()
    if args.speculative:
        result = prog.generate(params, prompts, args.max_new, speculative=True)
        out = result.tokens
        _log(f"MTP draft acceptance {result.acceptance_rate:.1%} "
             f"({result.drafts_accepted} of {result.drafts_checked} drafts)")
    else:
        out = prog.generate(params, prompts, args.max_new, temperature=args.temperature, seed=args.seed,
                            eos_id=args.eos)
    seconds = time.perf_counter() - clock
    _log(f"generated {out.size} tokens in {seconds:.2f}s including compilation "
         f"(KV cache {prog.report['kv_cache_bytes_per_token']:,} bytes/token)")
    for row in out:
        print(",".join(str(int(t)) for t in row))
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from .runtime.hf_import import HFCheckpoint, load_params, mtp_depth, spec_text
    from .runtime.params_io import save_params

    ckpt = HFCheckpoint(args.hf_dir)
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in Path(args.output).stem) or "imported"
    text = spec_text(ckpt.config, mtp_depth(ckpt), name if name[0].isalpha() else f"m_{name}", args.dtype)
    _write_atomic(Path(args.output), text)
    _log(f"wrote {args.output}")
    if args.params:
        from .frontend.parser import parse

        params = load_params(ckpt, parse(text, args.output))
        save_params(args.params, params)
        _log(f"wrote {len(params)} parameters ({sum(p.size for p in params.values()):,} values) to {args.params}")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _add_mesh_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", help="device mesh, e.g. fsdp=4,tensor=2 (axes: data, fsdp, fsdp_transpose, "
                        "expert, tensor, tensor_transpose)")
    parser.add_argument("--shard-mode", default="auto", choices=["auto", "explicit"])
    parser.add_argument("--rules", default="", help="sharding rules tried first, e.g. embed=fsdp+expert,mlp=tensor")
    parser.add_argument("--devices", type=int, help="simulated CPU devices (target cpu)")


def _add_fp8_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fp8", choices=["native", "emulate"],
        help="DeepSeek-V3's FP8 recipe (adds dsv3-fp8-quant): native FP8 GEMMs (H100/H200) or exact emulation",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="dsv3c", description="A compiler for DeepSeek-V3-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    c = sub.add_parser("compile", help="compile a .dsv3 spec or .mlir IR file for a target")
    c.add_argument("input")
    c.add_argument("--target", default="cpu")
    c.add_argument("--mode", default="train", choices=["train", "forward", "prefill", "decode"])
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    _add_mesh_options(c)
    group = c.add_mutually_exclusive_group()
    group.add_argument("-p", dest="pipeline", help="pass pipeline, e.g. 'dsv3-drop-mtp,dsv3-dce'")
    group.add_argument("--no-passes", action="store_true")
    c.add_argument("--dump-ir", metavar="DIR")
    c.add_argument("--report", metavar="FILE.json")
    _add_fp8_option(c)
    c.set_defaults(run=_cmd_compile)

    o = sub.add_parser("opt", help="run passes over a .mlir IR file and print the result")
    o.add_argument("input")
    o.add_argument("-p", dest="pipeline", default="")
    o.add_argument("--print-between-passes", action="store_true")
    o.set_defaults(run=_cmd_opt)

    t = sub.add_parser("train", help="train a model on CPU")
    t.add_argument("input")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--target", default="cpu")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=64)
    t.add_argument("--data", metavar="PATH", help=".npy array of token ids (default: a synthetic learnable stream)")
    t.add_argument("--ckpt", metavar="DIR")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    _add_mesh_options(t)
    t.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator, for multi-process runs")
    t.add_argument("--num-processes", type=int, default=1)
    t.add_argument("--process-id", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--metrics", metavar="FILE.jsonl", help="append each step's scalar metrics as a JSON line")
    _add_fp8_option(t)
    t.set_defaults(run=_cmd_train)

    g = sub.add_parser("generate", help="generate tokens with the KV-cache decoder (INPUT --ckpt DIR or --hf DIR)")
    g.add_argument("input", nargs="?", help=".dsv3 spec or .mlir IR (with --ckpt)")
    g.add_argument("--ckpt", metavar="DIR", help="training checkpoint or `import-hf --params` directory")
    g.add_argument("--hf", metavar="DIR", help="HuggingFace DeepSeek-V3 directory (config.json + safetensors)")
    g.add_argument("--prompt-ids", required=True, help="token ids, e.g. 1,2,3 (';' separates prompts)")
    g.add_argument("--max-new", type=int, required=True)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eos", type=int, help="stop token: a sequence repeats it once generated")
    g.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="parameter/compute dtype for --hf")
    g.add_argument("--speculative", action="store_true", help="greedy, drafting one token ahead with the MTP module")
    gp = g.add_mutually_exclusive_group()
    gp.add_argument("-p", dest="pipeline", help="pass pipeline (default: dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache)")
    gp.add_argument("--no-passes", action="store_true")
    g.set_defaults(run=_cmd_generate)

    h = sub.add_parser("import-hf", help="write the .dsv3 spec (and parameters) of a HuggingFace DeepSeek-V3 directory")
    h.add_argument("hf_dir")
    h.add_argument("-o", dest="output", required=True, metavar="OUT.dsv3")
    h.add_argument("--params", metavar="DIR", help="also write the parameters in the IR's layout (params.safetensors)")
    h.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="parameter/compute dtype (default: the config's)")
    h.set_defaults(run=_cmd_import_hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "steps", 1) is not None and getattr(args, "steps", 1) < 1:
            raise UserError("--steps must be at least 1")
        return args.run(args)
    except SpecError as err:
        print(str(err), file=sys.stderr)
        return 2
    except UserError as err:
        print(f"dsv3c: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsv3c: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
