"""The training loop behind `dsv3c train`: data, steps, progress, checkpoints and resumption."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from orbax.checkpoint import multihost

from ..dialects.text import print_ir
from ..frontend.errors import UserError
from .checkpoint import Checkpoints


class BatchSource(Protocol):
    """Training data. A source with a position of its own (a Grain stream) also has `get_state() -> dict`
    (JSON-serialisable) and `set_state(dict)`: every checkpoint stores the one, a resumed run calls the other."""

    def batch(self, step: int, batch: int, length: int) -> np.ndarray: ...


class Observer(Protocol):
    """Watches a run (progress bar, TensorBoard): told of every step's scalars and of every evaluation."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainLog:
    """Per-step scalar metrics and expert loads ([MoE layers, experts] per step) of a run, and its final state."""

    steps: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    expert_loads: list[np.ndarray] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    final_state: Any = None
    final_ema: Any = None  # the parameters' moving average after the last step, when the IR keeps one
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run (resumed ones included)

    @property
    def expert_load(self) -> np.ndarray | None:
        """The expert load of the last step."""
        return self.expert_loads[-1] if self.expert_loads else None

    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]


def load_balance(expert_load: np.ndarray) -> np.ndarray:
    """max/mean expert load per layer (1.0 is perfectly balanced)."""
    load = np.asarray(expert_load, np.float64)
    return load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-9)


def train(
    prog: Any,
    steps: int,
    data: BatchSource,
    seed: int = 0,
    ckpt: str | Path | None = None,
    resume: bool = False,
    save_every: int = 100,
    log_every: int = 10,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    metrics_path: str | Path | None = None,
    keep: int = 3,
    max_nonfinite: int = 5,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    observers: Sequence[Observer] = (),
) -> TrainLog:
    """Trains `prog` (a train-mode Program) up to `steps` total steps. With `resume`, continues from the latest
    checkpoint in `ckpt`; checkpoints are saved every `save_every` steps and at the end, the newest `keep` kept.
    `stop_after` ends the run early after that many steps of this call (to simulate an interruption).
    `metrics_path` gets one JSON line of scalar metrics per step and per evaluation; `evaluate(state)` runs every
    `eval_every` steps, and `observers` (progress bar, TensorBoard) see both. A step whose loss or gradient norm is
    not finite leaves the state as it was and is counted; `max_nonfinite` of them in a row stop the run with a
    UserError. A KeyboardInterrupt saves the last completed step before re-raising.

    A data source that implements `get_state() -> dict` (JSON-serialisable) and `set_state(dict)` has its state
    stored in every checkpoint and set again on resume; sources indexed by step (`runtime/data.py`) need none."""
    say = log or (lambda _msg: None)
    _wait_for_every_process()
    run = _Run(prog, data, Checkpoints(ckpt, keep) if ckpt is not None else None)
    try:
        state, ema, start = _start(prog, data, seed, run, resume, ckpt, say)
        history = TrainLog(skipped=run.skipped)
        tokens_per_step = prog.batch * prog.seq
        clock, last_logged = time.perf_counter(), start
        step, in_a_row = start, 0
        try:
            while step < steps and (stop_after is None or step - start < stop_after):
                batch = {"tokens": data.batch(step, prog.batch, prog.seq + 1)}
                state, metrics = prog.train_step(state, batch)
                if ema is not None:  # dispatched, not waited for: it runs while the next step is enqueued
                    ema = prog.ema.update(ema, state["params"], metrics["skipped"])
                step += 1
                scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                if scalars.pop("skipped"):
                    in_a_row += 1
                    run.skipped += 1
                    say(f"step {step}: loss {scalars['loss']:.4g}, grad norm {scalars['grad_norm']:.4g}: not finite, "
                        f"step skipped ({in_a_row} in a row, {run.skipped} in all)")
                    if in_a_row >= max_nonfinite:
                        run.finish()
                        raise UserError(
                            f"{in_a_row} non-finite steps in a row (steps {step - in_a_row + 1}..{step}): training "
                            f"stopped with the state of step {step - in_a_row}; lower the learning rate or check "
                            f"the data{run.where()}")
                else:
                    in_a_row = 0
                scalars["skipped_steps"] = run.skipped
                history.steps.append(step)
                history.metrics.append(scalars)
                history.skipped = run.skipped
                if metrics_path is not None:
                    with open(metrics_path, "a") as out:
                        out.write(json.dumps({"step": step, **scalars}) + "\n")
                if "expert_load" in metrics:
                    history.expert_loads.append(np.asarray(metrics["expert_load"]))
                for observer in observers:
                    observer.on_step(step, scalars)
                if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
                    _evaluate(evaluate, state, step, history, metrics_path, observers, say)
                if step % log_every == 0 or step == steps:
                    now = time.perf_counter()
                    rate = tokens_per_step * (step - last_logged) / max(now - clock, 1e-9)
                    clock, last_logged = now, step
                    say(_progress_line(step, steps, scalars, rate, history.expert_load))
                if step % save_every == 0:
                    run.save(step, state, ema)
        except KeyboardInterrupt:
            if run.checkpoints is not None and step > start:
                run.save(step, state, ema)
                run.finish()
                say(f"interrupted: saved step {step} to {ckpt}")
            raise
        if step > start and step % save_every:
            run.save(step, state, ema)
        run.finish()
    finally:
        run.close()
    history.final_state = state
    history.final_ema = ema
    return history


def _evaluate(evaluate: Callable[[Any], dict[str, float]], state: Any, step: int, history: TrainLog,
              metrics_path: str | Path | None, observers: Sequence[Observer], say: Callable[[str], None]) -> None:
    """One held-out evaluation: logged, recorded in the history and the metrics file, shown to the observers."""
    measured = evaluate(state)
    history.evals.append((step, measured))
    say("  ".join([f"eval at step {step}", *(f"{k} {v:.4f}" for k, v in measured.items())]))
    if metrics_path is not None:
        with open(metrics_path, "a") as out:
            out.write(json.dumps({"step": step, **measured}) + "\n")
    for observer in observers:
        observer.on_eval(step, measured)


def _wait_for_every_process(timeout_s: int = 3600) -> None:
    """In a multi-process run, waits until every process has compiled, on the coordination service. The first
    device collective (a step, or Orbax's own synchronisation) gives up after 30 seconds, and one process can be
    that much ahead: with a warm compilation cache only process 0 finds its executable there."""
    if jax.process_count() > 1:
        multihost.sync_global_processes("dsv3c-train-start", timeout=timeout_s,
                                        processes=set(range(jax.process_count())))


class _Run:
    """What the loop saves with every checkpoint besides the state: the schedule's length, the IR, the data
    source's position and the count of skipped steps."""

    def __init__(self, prog: Any, data: BatchSource, checkpoints: Checkpoints | None):
        self.checkpoints = checkpoints
        self.data = data
        self.skipped = 0
        self.ir = _input_ir(prog) if checkpoints is not None else ""
        self.total_steps = prog.total_steps

    def save(self, step: int, state: Any, ema: Any) -> None:
        if self.checkpoints is None:
            return
        tree = {**state, "ema": ema} if ema is not None else state
        get_state = getattr(self.data, "get_state", None)
        meta = {"total_steps": self.total_steps, "skipped_steps": self.skipped, "ir": self.ir,
                "data_state": get_state() if callable(get_state) else None}
        self.checkpoints.save(step, tree, meta)

    def where(self) -> str:
        if self.checkpoints is None:
            return ""
        step = self.checkpoints.latest_step()
        return "" if step is None else f" (last checkpoint: {self.checkpoints.path(step)})"

    def finish(self) -> None:
        """Waits for the checkpoints being written to be committed."""
        if self.checkpoints is not None:
            self.checkpoints.wait()

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()


def _start(prog: Any, data: BatchSource, seed: int, run: _Run, resume: bool, ckpt: str | Path | None,
           say: Callable[[str], None]) -> tuple[Any, Any, int]:
    """The state, EMA and step a run starts from: fresh from `seed`, or the newest checkpoint's."""
    if resume and run.checkpoints is None:
        raise UserError("--resume needs --ckpt DIR")
    found = run.checkpoints.latest_step() if resume else None
    if found is None:
        if resume:
            say(f"no checkpoint in {ckpt}: starting from step 0")
        state = prog.init_state(seed)
        return state, prog.ema.init(state["params"]) if prog.ema is not None else None, 0
    checkpoints = run.checkpoints
    meta = checkpoints.meta(found)
    state, ema = restore_state(prog, checkpoints, found)
    if prog.ema is not None and ema is None:
        say("note: the checkpoint holds no EMA; it starts from the restored parameters")
        ema = prog.ema.init(state["params"])
    run.skipped = int(meta.get("skipped_steps", 0))
    if callable(getattr(data, "set_state", None)):
        if meta.get("data_state") is None:
            raise UserError(f"checkpoint {checkpoints.path(found)} holds no data position (it was trained on another "
                            "kind of data)")
        data.set_state(meta["data_state"])
    say(f"resumed from {checkpoints.path(found)} at step {meta['step']}")
    if meta.get("total_steps", prog.total_steps) != prog.total_steps:
        say(f"warning: the run began with a learning-rate schedule over {meta['total_steps']} steps; this "
            f"program's is over {prog.total_steps}, so the resumed run differs from an uninterrupted one")
    if meta.get("ir") and meta["ir"] != run.ir:
        say("note: this program's IR differs from the one the checkpoint was trained with (the IR it was given, "
            "before passes, is in its meta item)")
    return state, ema, int(meta["step"])


def restore_state(prog: Any, checkpoints: Checkpoints, step: int) -> tuple[Any, Any]:
    """The training state and EMA (None when the checkpoint or the program has none) of a checkpoint, placed on
    `prog`'s devices and mesh, whatever mesh and process count wrote it."""
    shardings = prog.restore_shardings()
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          prog.abstract_state(), shardings)
    has_ema = "ema" in checkpoints.stored_arrays(step)
    if prog.ema is not None and has_ema:
        target["ema"] = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=prog.ema.on_device[name])
                         for name, leaf in target["params"].items()}
    restored = checkpoints.restore(step, target)
    ema = restored.pop("ema", None)
    return restored, prog.ema.init(ema) if ema is not None else None


def _input_ir(prog: Any) -> str:
    """The IR the program was given, before any pass: the model, independent of the mesh it is placed on."""
    return prog.dumps[0][1] if prog.dumps else print_ir(prog.module)


def _progress_line(step: int, steps: int, m: dict[str, float], tokens_per_s: float, load: np.ndarray | None) -> str:
    parts = [f"step {step:>6}/{steps}", f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}"]
    if m.get("mtp_loss"):
        parts.append(f"mtp {m['mtp_loss']:.4f}")
    if m.get("balance_loss"):
        parts.append(f"bal {m['balance_loss']:.2e}")
    if load is not None:
        parts.append(f"load max/mean {load_balance(load).mean():.2f}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']:.0f}")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    return "  ".join(parts)
