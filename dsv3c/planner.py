"""`dsv3c plan`: which layout of a training step to use on a target's chips.

A layout is a mesh (a split of the chips over `data`, `fsdp`, `fsdp_transpose`, `expert`, `tensor`,
`tensor_transpose`, and over `pipe` for pipeline stages: the target's DualPipeV), a sharding mode, a recompute policy
(`dsv3-remat`) and the head-loss form (`dsv3-fuse-head-loss`); the optimizer's `grads` dtype is the spec's. The plan:

1. enumerates the layouts (`meshes`: every split with at most three axes larger than one, and the same behind each
   `pipe` size `pipe_sizes` allows);
2. refuses those `dsv3-shard`, the batch or the micro-batches cannot place (with their message; explicit sharding
   with `pipe`) and prunes those whose analytic estimate (`dsv3c/estimate.py`, which is below what XLA needs) is
   above the chip's HBM;
3. compiles a few survivors ahead of time, each in its own spawned process (its memory returns to the system when
   it ends), at most `jobs` at once, `max_compiles` in all: first two thirds of them on the best meshes by the
   estimate, each with the target's default recompute policy; then the best of those that fits with one option
   changed at a time (another policy, the fused head loss, the other sharding mode), then further meshes (when none
   fit: the layouts with the least estimated memory);
4. picks the winner among the compiled layouts that fit (`choose_winner`).

Every layout is compiled exactly as a spec whose `parallel` block names it compiles (the candidate's layout is set
on the IR as `dsv3.parallel` and nothing else is passed), so the winner written by `--write-spec` compiles to the
memory its row shows.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from xdsl.dialects.builtin import ModuleOp

from .dialects.sharding import MESH_AXES
from .dialects.text import print_ir
from .estimate import Estimate, Model, Stages, estimate, model_facts, refusal, stage_facts
from .frontend.errors import DoesNotFitError, Dsv3cError, UserError
from .frontend.spec import ParallelSpec
from .layout import mesh_text, set_layout
from .passes.remat import POLICIES, RematPass
from .program import Source, load_module
from .report import model_flops
from .runtime.stages import PIPE_AXIS
from .targets import Target, resolve_target

GiB = 1 << 30
TOLERANCE = 0.05
"""Step-time bounds within 5% of the best count as equal: the bound is a roofline, not a measurement."""
MAX_AXES = 3
"""Meshes with more axes larger than one are not tried: their collectives nest, and no known layout needs them."""


@dataclass
class PlanRow:
    """One layout and what became of it. `status`: `fits`, `does not fit` (XLA's figure is above HBM), `out of
    memory` (XLA refused to compile it), `failed`, `not compiled` (beyond the compile budget), `pruned` (estimate
    above HBM) or `refused` (by `dsv3-shard` or the batch); `reason` says why in words. `memory` is XLA's
    `memory_per_device_bytes`, the step-time bound and MFU bound the compile report's."""

    layout: ParallelSpec
    status: str
    reason: str = ""
    estimate: Estimate | None = None
    memory: dict[str, int] | None = None
    step_time_bound_s: dict[str, Any] | None = None
    mfu_upper_bound: float | None = None
    compile_seconds: float | None = None
    winner: bool = False

    @property
    def label(self) -> str:
        return layout_label(self.layout)

    @property
    def bound(self) -> float:
        return self.step_time_bound_s["perfect_overlap"] if self.step_time_bound_s else math.inf

    def to_json(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "layout": {"mesh": layout.mesh, "shard_mode": layout.shard_mode, "remat": layout.remat,
                       "head_loss": layout.head_loss},
            "label": self.label, "status": self.status, "reason": self.reason, "winner": self.winner,
            "estimate_bytes": self.estimate.to_json() if self.estimate else None,
            "memory_per_device_bytes": self.memory, "step_time_bound_s": self.step_time_bound_s,
            "mfu_upper_bound": self.mfu_upper_bound, "compile_seconds": self.compile_seconds,
        }


def layout_label(layout: ParallelSpec) -> str:
    """`fsdp=2,tensor=2 auto remat=full` (and ` head_loss=fused`): a layout in one table cell."""
    text = f"{mesh_text(layout.mesh)} {layout.shard_mode} remat={layout.remat}"
    return text + (" head_loss=fused" if layout.head_loss == "fused" else "")


def meshes(chips: int, moe: bool, pipes: Sequence[int] = ()) -> list[dict[str, int]]:
    """Every split of `chips` over the mesh axes (sizes in `MESH_AXES` order) with at most `MAX_AXES` axes larger than
    one; `expert` only for a MoE model, `fsdp_transpose` only beside `fsdp` (alone, the shard rules give it the
    weights `fsdp` would take). One chip is `fsdp=1`. Each size in `pipes` that divides the chips adds the splits
    of the rest with that `pipe` axis in front (pipeline stages, each split like a smaller slice)."""
    found = _splits(chips, moe)
    for pipe in pipes:
        if pipe > 1 and chips % pipe == 0:
            found += [{PIPE_AXIS: pipe, **mesh} for mesh in _splits(chips // pipe, moe) if mesh != {"fsdp": 1}]
            if chips == pipe:
                found.append({PIPE_AXIS: pipe})
    return found


def pipe_sizes(chips: int, layers: int) -> list[int]:
    """The `pipe` sizes a plan tries: powers of two dividing the chips whose DualPipeV chunks (two per rank) each get
    a layer."""
    return [p for p in (2 ** k for k in range(1, chips.bit_length())) if chips % p == 0 and 2 * p <= layers]


def _splits(chips: int, moe: bool) -> list[dict[str, int]]:
    axes = [a for a in MESH_AXES if a != PIPE_AXIS and (moe or a != "expert")]
    found: list[dict[str, int]] = []

    def place(index: int, left: int, mesh: dict[str, int]) -> None:
        if index == len(axes):
            if left == 1 and len(mesh) <= MAX_AXES and ("fsdp_transpose" not in mesh or "fsdp" in mesh):
                found.append(mesh)
            return
        for size in (d for d in range(1, left + 1) if left % d == 0):
            place(index + 1, left // size, {**mesh, axes[index]: size} if size > 1 else mesh)

    place(0, chips, {})
    return found if chips > 1 else [{"fsdp": 1}]


def default_remat(target: Target) -> str:
    """The recompute policy of the target's default training pipeline."""
    return next((p.policy for p in target.default_passes("train") if isinstance(p, RematPass)), "none")


def choose_winner(rows: Sequence[PlanRow]) -> PlanRow | None:
    """Among the layouts that fit, the lowest step-time bound; among those within `TOLERANCE` of it, the least
    memory per device.

    The bound is the compile report's roofline: model FLOPs at peak, argument bytes from HBM, collective bytes over
    the interconnect. It counts the model's FLOPs, not recomputed ones, so recompute policies differ in it only
    through their collectives and memory traffic: on deepseek3-test / tpu-v5p-8 (benchmarks/RESULTS.md) five of the
    six layouts compiled are compute-bound at the same 0.188 s, full recompute or DeepSeek's, and one is bound by its
    collectives at 0.235 s. Where the bound cannot tell layouts apart, the memory left free decides: headroom is what
    lets a run grow its batch, and it is the reason the TPU target's default recomputes fully (MaxText's default
    too). A layout whose bound is lower by more than the tolerance (fewer collectives) wins whatever its memory."""
    fitting = [r for r in rows if r.status == "fits"]
    if not fitting:
        return None
    best = min(r.bound for r in fitting)
    close = [r for r in fitting if r.bound <= best * (1 + TOLERANCE)]
    return min(close, key=lambda r: (r.memory or {}).get("total", 0))


def plan(
    source: Source,
    target: str,
    batch: int,
    seq: int,
    *,
    jobs: int | None = None,
    max_compiles: int = 6,
    shard_modes: Sequence[str] = ("auto",),
    devices: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[PlanRow]:
    """Every layout tried for a training step of `batch` x `seq` tokens on `target`, the winner first (its
    `winner` set), then the other compiled layouts, the ones left uncompiled, pruned and refused. `devices` is the
    chip count of targets whose name does not fix it (`gpu-h100`). Bad input (a target without known HBM, a batch
    no layout can split) is a `UserError` before anything compiles."""
    say = log or (lambda _message: None)
    tgt = resolve_target(target)
    if not tgt.chip.hbm_bytes:
        raise UserError(f"plan needs a target whose chips' memory is known (tpu-v5p-N, tpu-v5e-N, tpu-v6e-N, gpu-h100, "
                        f"gpu-h200), not '{target}'")
    chips = tgt.chips or devices
    if not chips:
        raise UserError(f"target '{target}' does not fix its number of chips: give it (--devices N)")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive (got batch {batch}, seq {seq})")
    unknown = [m for m in shard_modes if m not in ("auto", "explicit")]
    if unknown or not shard_modes:
        raise UserError(f"shard modes must be auto or explicit (got {', '.join(unknown) or 'none'})")
    module = load_module(source)
    model = model_facts(module)
    rows = _candidates(module, model, tgt, chips, batch, seq, model_flops(module, batch, seq, train=True), shard_modes)
    batch_refusals = [r for r in rows if r.status == "refused" and r.reason.startswith(f"batch {batch} ")]
    if len(batch_refusals) == len(rows):
        raise UserError(f"batch {batch} does not divide over the batch axes of any layout of {chips} chips")

    remat, mode, budget, jobs = default_remat(tgt), shard_modes[0], max(1, max_compiles), jobs or os.cpu_count() or 1
    # Two thirds of the budget to meshes, in whole rounds of `jobs` compiles (a round waits for its slowest).
    first = _best_meshes(rows, remat, mode, max(jobs * ((budget - budget // 3) // jobs), 1))
    run = _Runner(module, tgt, batch, seq, jobs, say)
    run.compile(first)
    fitting = choose_winner(first)
    tried = [r.layout.mesh for r in first]
    more_meshes = [r for r in _best_meshes(rows, remat, mode, len(rows)) if r.layout.mesh not in tried]
    second = (_variants(rows, fitting) if fitting else _lowest_estimates(rows)) + more_meshes
    run.compile(list({id(r): r for r in second}.values())[: budget - len(first)])
    for row in rows:
        if row.status == "survives":
            row.status, row.reason = "not compiled", f"over the budget of {budget} compiles (--max-compiles)"
    winner = choose_winner(rows)
    if winner is not None:
        winner.winner = True
    return sorted(rows, key=_table_order)


def _candidates(
    module: ModuleOp, model: Model, tgt: Target, chips: int, batch: int, seq: int, flops: float,
    shard_modes: Sequence[str],
) -> list[PlanRow]:
    """Every layout, refused, pruned or `survives` (the estimate fits); meshes with a `pipe` axis are cut as
    `dsv3c compile` cuts them (`stage_facts`)."""
    heads = ("unfused", "fused") if model.logits else ("unfused",)
    rows = []
    stages: dict[int, Stages | str] = {}  # per pipe size: the stage facts, or why the model cannot be cut so
    for pipe in pipe_sizes(chips, model.layers):
        try:
            stages[pipe] = stage_facts(module, pipe)
        except UserError as err:
            stages[pipe] = str(err)
    for mesh in meshes(chips, model.moe_layers > 0, list(stages)):
        cut = stages.get(mesh.get(PIPE_AXIS, 1))
        why = cut if isinstance(cut, str) else refusal(model, mesh, batch, cut)
        for mode in shard_modes:
            for policy in POLICIES:
                for head in heads:
                    layout = ParallelSpec(mesh, mode, policy, head, tgt.name)
                    if why is None and cut is not None and mode == "explicit":
                        rows.append(PlanRow(layout, "refused", "explicit sharding does not compose with pipe"))
                        continue
                    if why is not None:
                        rows.append(PlanRow(layout, "refused", why))
                        continue
                    assert not isinstance(cut, str)
                    guess = estimate(model, mesh, policy, head == "fused", batch, seq, flops, tgt.chip, cut)
                    hbm = tgt.chip.hbm_bytes
                    if guess.total > hbm:
                        reason = f"estimate {guess.total / GiB:.1f} GiB is above the {hbm // GiB} GiB HBM"
                        rows.append(PlanRow(layout, "pruned", reason, guess))
                    else:
                        rows.append(PlanRow(layout, "survives", "", guess))
    return rows


def _rank(row: PlanRow) -> tuple[float, int]:
    assert row.estimate is not None
    return row.estimate.step_time_s, row.estimate.total


def _best_meshes(rows: list[PlanRow], remat: str, mode: str, count: int) -> list[PlanRow]:
    """The `count` best meshes by the estimate, each as its surviving layout with the target's default recompute
    policy, the unfused head loss and the first sharding mode (or, where that does not survive, its layout with the
    least estimated memory). Meshes that differ only in how FSDP's ways are split between `fsdp` and
    `fsdp_transpose` hold the same bytes and tie in the estimate: one of them stands for all (the plain `fsdp` one
    where it survives), so that the budget goes to meshes that differ."""
    families: dict[str, dict[str, list[PlanRow]]] = {}
    for row in rows:
        if row.status == "survives":
            mesh = row.layout.mesh
            fsdp = mesh.get("fsdp", 1) * mesh.get("fsdp_transpose", 1)
            family = mesh_text({**{a: n for a, n in mesh.items() if a != "fsdp_transpose"}, "fsdp": fsdp})
            families.setdefault(family, {}).setdefault(mesh_text(mesh), []).append(row)
    chosen = []
    for members in families.values():
        group = min(members.values(), key=lambda g: "fsdp_transpose" in g[0].layout.mesh)
        base = [r for r in group if (r.layout.remat, r.layout.head_loss, r.layout.shard_mode) == (remat, "unfused",
                                                                                                     mode)]
        chosen.append(base[0] if base else min(group, key=lambda r: _rank(r)[1]))
    return sorted(chosen, key=_rank)[:count]


def _variants(rows: list[PlanRow], best: PlanRow) -> list[PlanRow]:
    """The surviving layouts on `best`'s mesh that change one thing (the policy, the head loss or the sharding
    mode), least estimated memory first."""
    def changes(layout: ParallelSpec) -> int:
        return sum(getattr(layout, f) != getattr(best.layout, f) for f in ("remat", "head_loss", "shard_mode"))

    same = [r for r in rows if r.status == "survives" and r.layout.mesh == best.layout.mesh
            and changes(r.layout) == 1]
    return sorted(same, key=lambda r: _rank(r)[1])


def _lowest_estimates(rows: list[PlanRow]) -> list[PlanRow]:
    """When no compiled layout fits: the surviving layouts most likely to, least estimated memory first."""
    return sorted((r for r in rows if r.status == "survives"), key=lambda r: _rank(r)[1])


def _table_order(row: PlanRow) -> tuple[int, float, float]:
    compiled = ("fits", "does not fit", "out of memory", "failed")
    kinds = [*compiled, "not compiled", "pruned", "refused"]
    memory = (row.memory or {}).get("total") or (row.estimate.total if row.estimate else math.inf)
    return (0 if row.winner else 1 + kinds.index(row.status), row.bound if row.status in compiled else 0, memory)


class _Runner:
    """Compiles layouts in spawned processes, `jobs` at a time, one process per compile, with a progress line as
    each starts and ends. A compile process ends with the plan: it is stopped if the plan stops (an error, Ctrl-C),
    and it stops itself if the plan's process dies."""

    def __init__(self, module: ModuleOp, target: Target, batch: int, seq: int, jobs: int, say: Callable[[str], None]):
        self.module, self.target, self.batch, self.seq, self.jobs, self.say = module, target, batch, seq, jobs, say
        self.started = 0
        self.planned = 0

    def compile(self, rows: list[PlanRow]) -> None:
        self.planned += len(rows)
        queue = list(rows)
        context = multiprocessing.get_context("spawn")
        running: dict[Connection, tuple[BaseProcess, PlanRow, int]] = {}
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    row = queue.pop(0)
                    self.started += 1
                    self.say(f"[{self.started}/{self.planned}] compiling {row.label} ...")
                    module = self.module.clone()
                    set_layout(module, row.layout)
                    receive, send = context.Pipe(duplex=False)
                    args = (send, print_ir(module), self.target.name, self.batch, self.seq)
                    process = context.Process(target=_compile_in_child, args=args, daemon=True)
                    process.start()
                    send.close()
                    running[receive] = (process, row, self.started)
                for ready in wait(list(running)):
                    process, row, index = running.pop(ready)
                    try:
                        result = ready.recv()
                    except EOFError:  # it died without a word: killed, or out of host memory
                        process.join()
                        result = {"failed": f"the compile process died (exit code {process.exitcode})"}
                    process.join()
                    _record(row, result)
                    self.say(f"[{index}/{self.planned}] {row.label}: {_outcome(row)}")
        finally:
            for process, _, _ in running.values():
                process.kill()
                process.join()


def _record(row: PlanRow, result: dict[str, Any]) -> None:
    """Fills a compiled row from its process's result."""
    row.compile_seconds = result.get("seconds")
    if "failed" in result:
        row.status, row.reason = "failed", result["failed"]
        return
    if "out_of_memory" in result:
        row.status, row.reason = "out of memory", result["out_of_memory"]
        return
    if "error" in result:
        row.status, row.reason = "failed", result["error"]
        return
    row.memory = result["memory"]
    row.step_time_bound_s = result["step_time_bound_s"]
    row.mfu_upper_bound = result["mfu_upper_bound"]
    total, hbm = row.memory["total"], result["hbm"]
    row.status = "fits" if result["fits"] else "does not fit"
    row.reason = "" if result["fits"] else f"XLA needs {total / GiB:.1f} GiB, above the {hbm // GiB} GiB HBM"


def _outcome(row: PlanRow) -> str:
    seconds = f" ({row.compile_seconds:.0f} s)" if row.compile_seconds is not None else ""
    if row.memory is None:
        return f"{row.status}: {row.reason}{seconds}"
    return f"{row.memory['total'] / GiB:.3g} GiB, {row.status}, step >= {row.bound:.4g} s{seconds}"


def _compile_in_child(send: Connection, ir_text: str, target: str, batch: int, seq: int) -> None:
    """One ahead-of-time compile, in a fresh process: the layout is the IR's `dsv3.parallel`, nothing else is
    passed. libtpu's start-up chatter on standard error is silenced; the result goes back through `send` as data."""
    _exit_with(os.getppid())
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    if target != "gpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # AOT targets need only the CPU backend (their devices are topologies)
    clock = time.perf_counter()
    try:
        from .dialects.text import parse_ir
        from .program import compile

        report = compile(parse_ir(ir_text, "<plan>"), target=target, mode="train", batch=batch, seq=seq).report
        result = {
            "memory": report["memory_per_device_bytes"], "fits": report["fits_hbm"],
            "hbm": report["hbm_per_device_bytes"], "step_time_bound_s": report.get("step_time_bound_s"),
            "mfu_upper_bound": report.get("mfu_upper_bound"),
        }
    except DoesNotFitError as err:
        result = {"out_of_memory": f"XLA: {err.detail}{f' The temporaries {err.where}.' if err.where else ''}"}
    except Dsv3cError as err:
        result = {"error": str(err)}
    except Exception as err:  # a bug shows in its row; the plan goes on with the other layouts
        result = {"failed": f"{type(err).__name__}: {err}"}
    send.send({**result, "seconds": time.perf_counter() - clock})


def _exit_with(parent: int) -> None:
    """Ends this process when `parent` is gone (killed, say): a compile nobody waits for is not left running."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def format_table(rows: Sequence[PlanRow], hbm: int, examples: int = 3) -> str:
    """The plan as text: every compiled layout, then each other kind with its count and its first `examples`."""
    compiled = [r for r in rows if r.compile_seconds is not None]
    groups = [(status, title, [r for r in rows if r.status == status]) for status, title in (
        ("not compiled", "not compiled, over the compile budget (--max-compiles)"),
        ("pruned", "pruned: the estimate is above HBM"),
        ("refused", "refused by the shard pass or the batch"),
    )]
    shown = compiled + [r for _, _, group in groups for r in group[:examples]]
    width = max([len("layout"), *(len(r.label) for r in shown)])
    lines = [f"{'layout':<{width}}  {'GiB/device':>10} {'temp':>6} {'HBM':>4} {'step >=':>11} {'MFU <=':>6} "
             f"{'compile':>7}  result"]
    lines += [_line(r, hbm, width) for r in compiled]
    for _, title, group in groups:
        if group:
            lines.append(f"{title}: {len(group)} layout{'s' * (len(group) > 1)}, e.g.")
            lines += [_line(r, hbm, width) for r in group[:examples]]
    lines.append("GiB per device as XLA assigns them (~: the analytic estimate, below XLA's figure); step >=: the "
                 "roofline bound, MFU <=: the MFU it allows")
    return "\n".join(lines)


def _line(row: PlanRow, hbm: int, width: int) -> str:
    temp = f"{row.memory['temp'] / GiB:.3g}" if row.memory is not None else "-"
    if row.memory is not None:
        memory = f"{row.memory['total'] / GiB:.3g}"
    elif row.estimate is not None:
        memory = f"~{row.estimate.total / GiB:.3g}"  # the estimate, marked as one
    else:
        memory = "-"
    bound = f"{row.bound:.4g} s" if row.step_time_bound_s else "-"
    mfu = f"{row.mfu_upper_bound:.0%}" if row.mfu_upper_bound is not None else "-"
    seconds = f"{row.compile_seconds:.0f} s" if row.compile_seconds is not None else "-"
    if row.winner:
        result = "fits: the winner"
    elif row.status in ("not compiled", "pruned"):
        result = ""  # the group's title says why
    else:
        result = row.status + (f": {row.reason}" if row.reason else "")
    return (f"{row.label:<{width}}  {memory:>10} {temp:>6} {hbm // GiB:>4} {bound:>11} {mfu:>6} {seconds:>7}  "
            f"{result}").rstrip()


def winner_comment(row: PlanRow, target: str, batch: int, seq: int) -> str:
    """The comment `--write-spec` puts in the block: what was planned and what the compiler measured."""
    assert row.memory is not None
    return (f"dsv3c plan --target {target} --batch {batch} --seq {seq}: {row.memory['total'] / GiB:.1f} GiB per "
            f"device, step >= {row.bound:.4g} s")
