"""The `dsv3c` command: compile, opt, train.

Exit codes: 0 success, 2 a user error (printed `PATH:LINE:COL: error: ...` or `dsv3c: error: ...`, never a
traceback), 1 an internal error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .frontend.errors import SpecError, UserError


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


def _cmd_compile(args: argparse.Namespace) -> int:
    from .program import compile, write_dumps

    pipeline = "" if args.no_passes else (args.pipeline or "default")
    prog = compile(
        args.input, target=args.target, mode=args.mode, batch=args.batch, seq=args.seq,
        mesh=_parse_mesh(args.mesh), shard_mode=args.shard_mode, pipeline=pipeline, log=_log,
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
    from .dialects.text import parse_ir, print_ir
    from .pipeline import run_pipeline

    path = Path(args.input)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    module = parse_ir(path.read_text(), str(path))
    dumps = run_pipeline(module, args.pipeline or "")
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

    prog = compile(
        args.input, target=args.target, mode="train", batch=args.batch, seq=args.seq, steps=args.steps, log=_log
    )
    vocab = prog.report["vocab"]
    data = TokenFile(args.data, vocab, args.seed) if args.data else SyntheticStream(vocab, args.seed)
    history = train(
        prog, args.steps, data, seed=args.seed, ckpt=args.ckpt, resume=args.resume,
        save_every=args.save_every, log_every=args.log_every, log=print,
    )
    if history.metrics:
        first, last = history.metrics[0]["loss"], history.metrics[-1]["loss"]
        line = f"done: loss {first:.4f} -> {last:.4f} over steps {history.steps[0]}..{history.steps[-1]}"
        if history.expert_load is not None:
            balance = ", ".join(f"{x:.2f}" for x in load_balance(history.expert_load))
            line += f"; expert load max/mean per MoE layer {balance}"
        print(line)
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="dsv3c", description="A compiler for DeepSeek-V3-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    c = sub.add_parser("compile", help="compile a .dsv3 spec or .mlir IR file for a target")
    c.add_argument("input")
    c.add_argument("--target", default="cpu")
    c.add_argument("--mode", default="train", choices=["train", "forward", "prefill", "decode"])
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq", type=int, default=128)
    c.add_argument("--mesh")
    c.add_argument("--shard-mode", default="auto", choices=["auto", "explicit"])
    group = c.add_mutually_exclusive_group()
    group.add_argument("-p", dest="pipeline", help="pass pipeline, e.g. 'dsv3-drop-mtp,dsv3-dce'")
    group.add_argument("--no-passes", action="store_true")
    c.add_argument("--dump-ir", metavar="DIR")
    c.add_argument("--report", metavar="FILE.json")
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
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.set_defaults(run=_cmd_train)
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
