"""The `dsv3c` command: compile, opt, train, plan and the rest.

Exit codes: 0 success, 2 a user error (printed `PATH:LINE:COL: error: ...` or `dsv3c: error: ...`, never a
traceback), 1 an internal error, or a plan in which no layout fits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .frontend.errors import SpecError, UserError
from .frontend.limits import MAX_IR_BYTES, MAX_SPEC_BYTES
from .frontend.source import read_source
from .options import (
    MAX_SEED,
    check_devices,
    check_input,
    check_output_file,
    check_read_dir,
    check_write_dir,
    finite_at_least,
    int_at_least,
    parse_mesh,
)

if TYPE_CHECKING:
    from xdsl.dialects.builtin import ModuleOp


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad options as a dsv3c user error (exit 2) instead of its own format."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prepare_platform(args: argparse.Namespace) -> None:
    """Settings JAX reads when its backends start, so before anything runs: simulated CPU devices, the CPU platform
    for ahead-of-time targets (their devices come from topology descriptions), and the distributed runtime."""
    devices = getattr(args, "devices", None)
    if devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    import jax  # already imported with the dsv3c package, so its configuration is set directly as well

    if args.target != "gpu" and not os.environ.get("JAX_PLATFORMS"):
        # Only the CPU backend runs here: without this, JAX would also start libtpu, which logs host-bound errors
        # on machines without a TPU (TPU targets load libtpu themselves, for topologies only).
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    if getattr(args, "coordinator", None):
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def _cmd_compile(args: argparse.Namespace) -> int:
    check_input(args.input)
    mesh = parse_mesh(args.mesh)
    check_devices(args.devices, mesh)
    check_write_dir(args.dump_ir, "--dump-ir")
    check_output_file(args.report, "--report")
    _prepare_platform(args)  # before JAX starts a backend
    from .memory_breakdown import Breakdown, describe
    from .pipeline_report import write_timeline_png
    from .program import compile, write_dumps

    pipeline = "" if args.no_passes else (args.pipeline or "default")
    prog = compile(
        args.input, target=args.target, mode=args.mode, batch=args.batch, seq=args.seq,
        mesh=mesh, shard_mode=args.shard_mode, pipeline=pipeline, log=_log,
        devices=args.devices, rules=args.rules, fp8=args.fp8, memory_breakdown=True,
    )
    if args.dump_ir:
        paths = write_dumps(prog.dumps, args.dump_ir)
        _log(f"wrote {len(paths)} dumps to {args.dump_ir}")
        picture = Path(args.dump_ir) / "pipeline.png"
        if prog.stages is not None and prog.mode == "train" and write_timeline_png(prog.stages, picture):
            _log(f"wrote the pipeline timeline to {picture}")
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
    if "memory_breakdown" in r:
        peak = r["memory_peak"]
        breakdown = Breakdown(r["memory_breakdown"], peak["instruction"], peak["phase"])
        print(f"temporaries {peak['temp'] / 2**30:.2f} GiB, {describe(breakdown)}")
    if isinstance(r.get("pipeline"), dict):
        p = r["pipeline"]
        print(f"pipeline {p['schedule']}: {p['ranks']} ranks, {p['chunks']} chunks, {p['microbatches']} micro-batches, "
              f"{p['ticks']} ticks, bubble {p['bubble']:g} chunk-forwards (formula {p['bubble_formula']:g}), "
              f"{p['bubble_fraction']:.1%} of all ranks' time idle")
        print(p["timeline"])
    return 0


def _count(n: int) -> str:
    """A parameter count in the unit people quote: 671.026B, 15.9M, 289.1K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def _cmd_opt(args: argparse.Namespace) -> int:
    if args.list_passes:
        return _cmd_passes(args)
    if args.input is None:
        raise UserError("opt needs INPUT.mlir (or --list-passes)")
    check_input(args.input)
    from .dialects.text import parse_ir_with_positions, print_ir
    from .pipeline import run_pipeline

    path = Path(args.input)
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
    from .runtime.data import SyntheticStream, TokenFile, read_token_ids

    check_input(args.input)
    mesh = parse_mesh(args.mesh)
    check_devices(args.devices, mesh, args.num_processes)
    if args.resume and not args.ckpt:
        raise UserError("--resume needs --ckpt DIR (the directory to resume from)")
    check_write_dir(args.ckpt, "--ckpt")
    check_output_file(args.metrics, "--metrics")
    check_output_file(args.plot, "--plot")
    check_write_dir(args.tensorboard, "--tensorboard")
    if args.data:
        read_token_ids(args.data)
    _prepare_platform(args)  # before JAX starts a backend
    from .program import compile, load_module
    from .progress import check_plotting, live_line, observers_for, plot_curves, printer
    from .runtime.evaluate import held_out_loss
    from .runtime.loop import load_balance, train

    # Data are checked against the vocabulary before compiling; parsing the model twice costs milliseconds.
    vocab = _vocab_of(load_module(args.input))
    data = TokenFile(args.data, vocab, args.seed) if args.data else _text_data(args, vocab)
    if args.plot:
        check_plotting()
    observers = observers_for(args.steps, args.batch * args.seq, args.tensorboard)

    with live_line("compiling", _log) as log:
        prog = compile(
            args.input, target=args.target, mode="train", batch=args.batch, seq=args.seq,
            steps=_schedule_steps(args), log=log, mesh=mesh, shard_mode=args.shard_mode, devices=args.devices,
            rules=args.rules, fp8=args.fp8,
        )
    data = data or SyntheticStream(prog.report["vocab"], args.seed)
    held_out = getattr(data, "held_out", None)
    try:
        history = train(
            prog, args.steps, data, seed=args.seed, ckpt=args.ckpt, resume=args.resume,
            save_every=args.save_every, log_every=args.log_every, log=printer(observers), metrics_path=args.metrics,
            keep=args.keep, max_nonfinite=args.max_nonfinite,
            evaluate=held_out_loss(prog, held_out) if held_out else None,
            eval_every=data.eval_every if held_out else 0, observers=observers,
        )
    finally:
        for observer in observers:
            observer.close()
    if args.plot:
        plot_curves(history, args.plot)
        _log(f"wrote {args.plot}")
    if history.metrics:
        first, last = history.metrics[0]["loss"], history.metrics[-1]["loss"]
        line = f"done: loss {first:.4f} -> {last:.4f} over steps {history.steps[0]}..{history.steps[-1]}"
        if history.expert_load is not None:
            balance = ", ".join(f"{x:.2f}" for x in load_balance(history.expert_load))
            line += f"; expert load max/mean per MoE layer {balance}"
        if history.skipped:
            line += f"; {history.skipped} non-finite step(s) skipped"
        print(line)
    return 0


def _text_data(args: argparse.Namespace, vocab: int):
    """The Grain stream the data options and the spec's `train { data { ... } }` block describe, or None (the
    synthetic stream) when neither names any data. Everything is opened and checked here, before compiling."""
    from .frontend.spec import DataSpec
    from .runtime.text_data import open_data, resolve

    spec_data, base = None, Path(args.input).parent
    if Path(args.input).suffix == ".dsv3":
        from .frontend.parser import load

        spec_data = load(args.input).data
    flags = {"text": args.text, "tokens": args.tokens, "tokenizer": args.tokenizer, "eval_every": args.eval_every,
             "eval_batches": args.eval_batches, "eval_fraction": args.eval_fraction, "jsonl_key": args.jsonl_key,
             "bin_dtype": args.bin_dtype, "eos_id": args.eos_id}
    if spec_data is None and all(v is None for v in flags.values()):
        return None
    data = resolve(spec_data or DataSpec(), base, **flags)
    stream = open_data(data, vocab, args.batch, args.seq, args.seed)
    _log(f"data: {stream.description}")
    return stream


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from .runtime.documents import TextDocuments, expand
    from .runtime.tokenizer import train_tokenizer

    check_output_file(args.output, "-o")
    files = expand(args.text, "TEXT")
    docs = TextDocuments(files, args.jsonl_key)
    size = train_tokenizer(docs, args.vocab, args.output)
    megabytes = sum(f.stat().st_size for f in files) / 2**20
    _log(f"trained a byte-level BPE tokenizer of {size} tokens on {len(docs):,} documents ({len(files)} file(s), "
         f"{megabytes:.1f} MiB); wrote {args.output}")
    return 0


def _schedule_steps(args: argparse.Namespace) -> int:
    """The run length the learning-rate schedule decays over (when the spec's `decay_steps` is 0). It belongs to the
    run, not to one invocation: `--total-steps`, else what the checkpoint being resumed recorded, else `--steps`."""
    from .runtime.checkpoint import latest_meta

    recorded = (latest_meta(args.ckpt) or {}).get("total_steps") if args.resume else None
    if args.total_steps is not None:
        if recorded is not None and recorded != args.total_steps:
            _log(f"warning: --total-steps {args.total_steps} changes the schedule the run began with ({recorded} "
                 "steps): the result will differ from an uninterrupted run")
        total = args.total_steps
    else:
        total = recorded or args.steps
    if recorded is not None and args.steps > total:
        _log(f"note: the learning-rate schedule spans {total} steps; steps after it keep its final rate "
             "(start a run with --total-steps to plan a longer one)")
    return total


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


def _vocab_of(module: ModuleOp) -> int:
    """The vocabulary size the IR declares: the rows of its embedding table."""
    from .dialects.dsv3 import shape_of, walk_params

    tables = [op for op in walk_params(module) if op.pname == "embed"]
    if not tables:
        raise UserError("the model declares no 'embed' parameter, so its vocabulary is unknown")
    return shape_of(tables[0].result)[0]


def _check_prompt_ids(prompts: list[list[int]], vocab: int) -> None:
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise UserError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    if bool(args.hf) == bool(args.input or args.ckpt) or (args.input and not args.ckpt):
        raise UserError("generate takes either INPUT --ckpt DIR or --hf DIR")
    prompts = _parse_prompts(args.prompt_ids)
    if args.input:
        check_input(args.input)
    check_read_dir(args.ckpt, "--ckpt")
    check_read_dir(args.hf, "--hf")
    if args.ema:
        from .runtime.checkpoint import is_training_checkpoint

        if args.hf or not is_training_checkpoint(args.ckpt):
            raise UserError("--ema reads the moving average a training checkpoint keeps: give INPUT --ckpt with a "
                            "`dsv3c train --ckpt` directory")
    from .program import compile, load_module
    from .runtime.hf_import import import_hf
    from .runtime.params_io import load_params

    params = None
    source = args.input
    if args.hf:
        source, params = import_hf(args.hf, dtype=args.dtype)
        _log(f"imported {args.hf}")
    _check_prompt_ids(prompts, _vocab_of(load_module(source)))
    default = "dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache" if args.speculative else "default"
    pipeline = "" if args.no_passes else (args.pipeline or default)
    prog = compile(source, mode="decode", batch=len(prompts), seq=max(map(len, prompts)) + args.max_new,
                   pipeline=pipeline, log=_log)
    if params is None:
        params = load_params(args.ckpt, prog.infos, ema=args.ema)
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
    check_read_dir(args.hf_dir, "HF_DIR")
    check_output_file(args.output, "-o")
    check_write_dir(args.params, "--params")
    from .frontend.parser import parse
    from .runtime.hf_import import HFCheckpoint, load_params, mtp_depth, spec_text
    from .runtime.params_io import save_params

    ckpt = HFCheckpoint(args.hf_dir)
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in Path(args.output).stem) or "imported"
    text = spec_text(ckpt.config, mtp_depth(ckpt), name if name[0].isalpha() else f"m_{name}", args.dtype)
    # Everything is read and checked before anything is written: a damaged checkpoint leaves no half an import.
    params = load_params(ckpt, parse(text, args.output)) if args.params else None
    _write_atomic(Path(args.output), text)
    _log(f"wrote {args.output}")
    if params is not None:
        save_params(args.params, params)
        _log(f"wrote {len(params)} parameters ({sum(p.size for p in params.values()):,} values) to {args.params}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import time

    check_input(args.input)
    if args.write_spec:
        if Path(args.input).suffix != ".dsv3":
            raise UserError("--write-spec writes the winner into the input spec: INPUT must be a .dsv3 file, not IR")
        check_output_file(args.write_spec, "--write-spec")
    _prepare_platform(args)  # before JAX starts a backend
    from .frontend.rewrite import parallel_block, with_parallel_block
    from .planner import GiB, format_table, plan, winner_comment
    from .targets import resolve_target

    clock = time.perf_counter()
    modes = ("auto", "explicit") if args.shard_mode == "both" else (args.shard_mode,)
    rows = plan(args.input, args.target, args.batch, args.seq, jobs=args.jobs, max_compiles=args.max_compiles,
                shard_modes=modes, devices=args.devices, log=_log)
    wall = time.perf_counter() - clock
    target = resolve_target(args.target)
    chips, hbm = target.chips or args.devices, target.chip.hbm_bytes
    winner = next((r for r in rows if r.winner), None)
    compiled = sum(r.compile_seconds is not None for r in rows)
    if args.json:
        document = {"input": args.input, "target": target.name, "chips": chips, "batch": args.batch, "seq": args.seq,
                    "hbm_per_device_bytes": hbm, "wall_seconds": wall, "winner": winner.label if winner else None,
                    "rows": [r.to_json() for r in rows]}
        print(json.dumps(document, indent=1))
    else:
        print(f"{args.input} on {target.name} ({chips} chips of {hbm // GiB} GiB), train batch {args.batch} seq "
              f"{args.seq}: {len(rows)} layouts, {compiled} compiled, {wall:.0f} s")
        print(format_table(rows, hbm))
        print(f"winner: {winner.label}" if winner else "no layout fits")
    if args.write_spec and winner is not None:
        text = read_source(args.input, "spec", MAX_SPEC_BYTES)
        block = parallel_block(winner.layout, winner_comment(winner, target.name, args.batch, args.seq))
        _write_atomic(Path(args.write_spec), with_parallel_block(text, args.input, block))
        _log(f"wrote {args.write_spec} with the winner's parallel block")
    elif args.write_spec:
        _log(f"nothing written to {args.write_spec}: no layout fits")
    return 0 if winner is not None else 1


def _cmd_export_hf(args: argparse.Namespace) -> int:
    check_input(args.input)
    if Path(args.input).suffix == ".mlir":
        raise UserError("export-hf needs the model's .dsv3 spec (config.json is written from it), not IR")
    check_read_dir(args.ckpt, "--ckpt")
    check_write_dir(args.output, "-o")
    if args.tokenizer:
        check_input(args.tokenizer, "--tokenizer")
    from .frontend.parser import load
    from .runtime.hf_export import export_hf, params_from_checkpoint

    spec = load(args.input)
    params = params_from_checkpoint(args.ckpt, ema=args.ema)
    out = export_hf(spec, params, args.output, fp8=args.fp8, shard_bytes=args.shard_mb << 20,
                    block=args.block, tokenizer=args.tokenizer)
    shards = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    what = f"FP8 (E4M3, {args.block}x{args.block} blocks)" if args.fp8 else spec.dtypes.params
    _log(f"wrote {out}: config.json and {len(shards)} shard(s), {size / 2**20:,.1f} MiB, weights in {what}")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, except where there is none to show (None, False, "")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS))
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


_TARGETS = "cpu, gpu (the local GPU), gpu-h100, gpu-h200, tpu-v5p-N, tpu-v5e-N, tpu-v6e-N (ahead of time)"
_MODES = "train (a full training step), forward (logits), prefill and decode (KV-cache inference steps)"
_SPEC_OR_IR = "a .dsv3 spec or a .mlir file of dsv3 IR (as --dump-ir writes it)"


def _add_mesh_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", metavar="AXIS=N,...", help="device mesh, e.g. fsdp=4,tensor=2 (axes: "
                        "data, fsdp, fsdp_transpose, expert, tensor, tensor_transpose); default: the spec's parallel "
                        "block's, else FSDP over all devices")
    parser.add_argument("--shard-mode", choices=["auto", "explicit"],
                        help="auto: XLA propagates shardings; explicit: JAX's explicit-axis sharding in the types; "
                        "default: the spec's parallel block's, else auto")
    parser.add_argument("--rules", default="", metavar="LOGICAL=AXIS+AXIS,...",
                        help="sharding rules tried before the defaults, e.g. embed=fsdp+expert,mlp=tensor")
    parser.add_argument("--devices", type=int_at_least(1), metavar="N",
                        help="simulated CPU devices (target cpu); must equal the mesh's size when both are given")


def _add_fp8_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fp8", choices=["native", "emulate"],
        help="DeepSeek-V3's FP8 recipe (adds dsv3-fp8-quant): native FP8 GEMMs (H100/H200) or exact emulation; "
        "default: off",
    )


def _add_pipeline_options(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-p", dest="pipeline", metavar="PIPELINE",
                       help=f"pass pipeline, e.g. 'dsv3-drop-mtp,dsv3-dce' (`dsv3c passes` lists them); default: "
                       f"{default}")
    group.add_argument("--no-passes", action="store_true", help="run no pass at all")


def _pass_summary(name: str) -> str:
    """One line on a pass: its class docstring, or its module's where the class has none of its own."""
    import dataclasses
    import sys as _sys

    from .passes import ALL_PASSES

    cls = ALL_PASSES[name]()
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses write when a class has no docstring
        doc = _sys.modules[cls.__module__].__doc__ or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    line = line.split(". ")[0].rstrip(".").removeprefix(f"`{name}`: ")
    options = " ".join(f"{f.name}={_option_text(f.default)}" for f in dataclasses.fields(cls))
    return f"{name}{'{' + options + '}' if options else ''}: {line}"


def _option_text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def _cmd_passes(args: argparse.Namespace) -> int:
    from .passes import ALL_PASSES
    from .pipeline import pipeline_text
    from .targets import PipelineRequest, resolve_target

    for name in ALL_PASSES:
        print(_pass_summary(name))
    print("\ndefault pipelines (one device, no FP8; a mesh adds dsv3-shard and, to train, dsv3-overlap):")
    for target in (resolve_target(name) for name in ("cpu", "gpu-h100", "tpu-v5p-8")):
        for mode in ("train", "forward", "prefill", "decode"):
            passes = target.pipeline(target.default_passes(mode), mode, PipelineRequest())
            print(f"  {target.name:<10} {mode:<8} {pipeline_text(passes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="dsv3c", description="A compiler for DeepSeek-V3-family models.",
                             formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def command(name: str, text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        cmd.set_defaults(run=run)
        return cmd

    c = command("compile", "compile a model for a target and report its size, FLOPs and memory", _cmd_compile)
    c.add_argument("input", metavar="INPUT", help=_SPEC_OR_IR)
    c.add_argument("--target", default="cpu", help=f"what to compile for: {_TARGETS}")
    c.add_argument("--mode", default="train", choices=["train", "forward", "prefill", "decode"], help=_MODES)
    c.add_argument("--batch", type=int_at_least(1), default=8, help="sequences per step")
    c.add_argument("--seq", type=int_at_least(1), default=128, help="tokens per sequence (decode: the cache length)")
    _add_mesh_options(c)
    _add_pipeline_options(c, "the mode's default pipeline")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR before and after each pass, StableHLO and XLA's HLO")
    c.add_argument("--report", metavar="FILE.json", help="write the compile report as JSON")
    _add_fp8_option(c)

    o = command("opt", "run passes over a .mlir file of dsv3 IR and print the result", _cmd_opt)
    o.add_argument("input", nargs="?", metavar="INPUT.mlir", help="dsv3 IR, as --dump-ir writes it")
    o.add_argument("-p", dest="pipeline", default="", metavar="PIPELINE",
                   help="pass pipeline, e.g. 'dsv3-drop-mtp,dsv3-dce'; default: none (parse, verify and print)")
    o.add_argument("--print-between-passes", action="store_true", help="print the IR after every pass")
    o.add_argument("--list-passes", action="store_true", help="list the passes and exit (as `dsv3c passes`)")

    t = command("train", "train a model (on CPU or a local GPU)", _cmd_train)
    t.add_argument("input", metavar="INPUT", help=_SPEC_OR_IR)
    t.add_argument("--steps", type=int_at_least(1), required=True, metavar="N",
                   help="train until step N (a resumed run counts the steps already done)")
    t.add_argument("--total-steps", type=int_at_least(1), metavar="N",
                   help="the run's planned length, which the learning-rate schedule decays over when the spec "
                   "gives no decay_steps; default: what a resumed checkpoint recorded, else --steps")
    t.add_argument("--target", default="cpu", help="cpu or gpu (a local device)")
    t.add_argument("--batch", type=int_at_least(1), default=16, help="sequences per step")
    t.add_argument("--seq", type=int_at_least(1), default=64, help="tokens per sequence")
    t.add_argument("--data", metavar="FILE.npy", help=".npy array of token ids; default: a synthetic learnable stream")
    t.add_argument("--ckpt", metavar="DIR", help="save checkpoints here (created if missing); default: none")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt")
    t.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="initialisation and data seed")
    _add_mesh_options(t)
    t.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator, for multi-process runs")
    t.add_argument("--num-processes", type=int_at_least(1), default=1, help="processes in a multi-process run")
    t.add_argument("--process-id", type=int_at_least(0), default=0, help="this process's index in [0, num-processes)")
    t.add_argument("--save-every", type=int_at_least(1), default=100, metavar="N",
                   help="save a checkpoint every N steps (and at the end)")
    t.add_argument("--keep", type=int_at_least(1), default=3, metavar="N", help="keep the newest N checkpoints")
    t.add_argument("--max-nonfinite", type=int_at_least(1), default=5, metavar="K",
                   help="stop after K steps in a row with a non-finite loss or gradient norm (each is skipped)")
    t.add_argument("--log-every", type=int_at_least(1), default=10, metavar="N", help="print progress every N steps")
    t.add_argument("--metrics", metavar="FILE.jsonl", help="append each step's scalar metrics as a JSON line")
    d = t.add_argument_group("data (override the spec's train { data { ... } } block)")
    d.add_argument("--text", metavar="GLOB", help="raw text: .jsonl (one document a line), .array_record (one a "
                   "record) or any other file (one document); comma-separated globs, ** recurses")
    d.add_argument("--tokenizer", metavar="tokenizer.json", help="Hugging Face tokenizer for --text")
    d.add_argument("--tokens", metavar="GLOB", help="token-id shards: .npy or raw .bin (see --bin-dtype)")
    d.add_argument("--bin-dtype", choices=["uint16", "uint32", "int32"], help="token type of .bin shards; "
                   "default: uint16")
    d.add_argument("--eos-id", type=int_at_least(0), metavar="ID", help="the token that ends documents in token "
                   "shards; default: none (shards are cut into pieces)")
    d.add_argument("--jsonl-key", metavar="KEY", help="the text field of .jsonl lines; default: text")
    d.add_argument("--eval-every", type=int_at_least(0), metavar="N", help="held-out loss every N steps; default: 0")
    d.add_argument("--eval-batches", type=int_at_least(1), metavar="N", help="held-out batches; default: 4")
    d.add_argument("--eval-fraction", type=finite_at_least(0), metavar="F",
                   help="fraction of documents held out; default: 0.05")
    w = t.add_argument_group("watching a run")
    w.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files (needs tensorboardX)")
    w.add_argument("--plot", metavar="FILE.png", help="at the end, plot the loss and eval curves (needs matplotlib)")
    _add_fp8_option(t)

    g = command("generate", "generate tokens with the KV-cache decoder (INPUT --ckpt DIR or --hf DIR)", _cmd_generate)
    g.add_argument("input", nargs="?", metavar="INPUT", help=f"{_SPEC_OR_IR} (with --ckpt)")
    g.add_argument("--ckpt", metavar="DIR", help="training checkpoint (run directory or one step_N folder) or "
                   "`import-hf --params` directory")
    g.add_argument("--hf", metavar="DIR", help="HuggingFace DeepSeek-V3 directory (config.json + safetensors)")
    g.add_argument("--prompt-ids", required=True, metavar="IDS",
                   help="token ids, e.g. 1,2,3 (';' separates prompts, of any lengths)")
    g.add_argument("--max-new", type=int_at_least(1), required=True, metavar="N", help="tokens to generate per prompt")
    g.add_argument("--temperature", type=finite_at_least(0), default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="sampling seed")
    g.add_argument("--eos", type=int_at_least(0), metavar="ID",
                   help="stop token: a sequence repeats it once generated; default: none")
    g.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="parameter/compute dtype for --hf; default: the "
                   "config's")
    g.add_argument("--speculative", action="store_true", help="greedy, drafting one token ahead with the MTP module")
    g.add_argument("--ema", action="store_true", help="use the training checkpoint's EMA of the parameters")
    _add_pipeline_options(g, "dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache")

    h = command("import-hf", "write the .dsv3 spec (and parameters) of a HuggingFace DeepSeek-V3 directory",
                _cmd_import_hf)
    h.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and *.safetensors")
    h.add_argument("-o", dest="output", required=True, metavar="OUT.dsv3", help="the spec to write")
    h.add_argument("--params", metavar="DIR", help="also write the parameters in the IR's layout (params.safetensors)")
    h.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="parameter/compute dtype; default: the config's")

    n = command("plan", "choose the layout of a training step on a target's chips: meshes, recompute and memory "
                "options, pruned by an estimate, the best few compiled ahead of time", _cmd_plan)
    n.add_argument("input", metavar="INPUT", help=_SPEC_OR_IR)
    n.add_argument("--target", required=True, help="tpu-v5p-N, tpu-v5e-N, tpu-v6e-N, gpu-h100 or gpu-h200 (with "
                   "--devices)")
    n.add_argument("--batch", type=int_at_least(1), required=True, help="sequences per step")
    n.add_argument("--seq", type=int_at_least(1), required=True, help="tokens per sequence")
    n.add_argument("--shard-mode", default="auto", choices=["auto", "explicit", "both"], help="sharding modes to try")
    n.add_argument("--max-compiles", type=int_at_least(1), default=6, metavar="K",
                   help="compile at most K layouts (each takes seconds to minutes)")
    n.add_argument("--jobs", type=int_at_least(1), default=os.cpu_count() or 1, metavar="N",
                   help="compiles at once, each in its own process")
    n.add_argument("--devices", type=int_at_least(1), metavar="N", help="chips, for a target whose name does not "
                   "fix them (gpu-h100, gpu-h200)")
    n.add_argument("--json", action="store_true", help="print every layout as JSON instead of the table")
    n.add_argument("--write-spec", metavar="OUT.dsv3", help="write INPUT with the winner as its parallel block")

    x = command("export-hf", "write a trained model as a HuggingFace DeepSeek-V3 directory (the inverse of "
                "import-hf)", _cmd_export_hf)
    x.add_argument("input", metavar="INPUT", help="the model's .dsv3 spec")
    x.add_argument("--ckpt", required=True, metavar="DIR",
                   help="training checkpoint (its latest step) or `import-hf --params` directory")
    x.add_argument("-o", dest="output", required=True, metavar="HF_DIR", help="directory to create (absent or empty)")
    x.add_argument("--ema", action="store_true", help="export the checkpoint's EMA of the parameters")
    x.add_argument("--fp8", action="store_true",
                   help="store Linear weights as FP8 E4M3 with weight_scale_inv blocks, as DeepSeek-V3's release")
    x.add_argument("--block", type=int_at_least(1), default=128, help="FP8 scale block (rows = columns)")
    x.add_argument("--shard-mb", type=int_at_least(1), default=5120, metavar="MB", help="largest shard")
    x.add_argument("--tokenizer", metavar="tokenizer.json", help="copy this tokenizer into the directory")

    k = command("tokenizer", "train a byte-level BPE tokenizer (tokenizer.json) on text files", _cmd_tokenizer)
    k.add_argument("text", metavar="GLOB", help="text files: .jsonl, .array_record or plain (comma-separated globs)")
    k.add_argument("-o", dest="output", required=True, metavar="tokenizer.json", help="the tokenizer to write")
    k.add_argument("--vocab", type=int_at_least(1), required=True, metavar="N",
                   help="at most this many tokens: the model's vocab or less")
    k.add_argument("--jsonl-key", default="text", metavar="KEY", help="the text field of .jsonl lines")

    command("passes", "list the passes, their options with defaults, and the default pipelines", _cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SpecError as err:
        print(str(err), file=sys.stderr)
        return 2
    except UserError as err:
        print(f"dsv3c: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dsv3c passes | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("dsv3c: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
