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

from ..frontend.errors import UserError
from .checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint


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
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    observers: Sequence[Observer] = (),
) -> TrainLog:
    """Trains `prog` (a train-mode Program) up to `steps` total steps. With `resume`, continues from the latest
    checkpoint in `ckpt` (and the data from its position then). `stop_after` ends the run early after that many
    steps of this call (to simulate an interruption). `metrics_path` gets one JSON line of scalar metrics per step
    and per evaluation. `evaluate(state)` runs every `eval_every` steps. A KeyboardInterrupt saves the last
    completed step before re-raising."""
    say = log or (lambda _msg: None)
    state = prog.init_state(seed)
    start = 0
    if resume:
        if ckpt is None:
            raise UserError("--resume needs --ckpt DIR")
        found = latest_checkpoint(ckpt)
        if found is None:
            say(f"no checkpoint in {ckpt}: starting from step 0")
        else:
            state, meta = restore_checkpoint(found, prog.abstract_state())
            start = int(meta["step"])
            _restore_data(data, meta, found)
            say(f"resumed from {found} at step {start}")
            if meta.get("total_steps", prog.total_steps) != prog.total_steps:
                say(f"warning: the run began with a learning-rate schedule over {meta['total_steps']} steps; this "
                    f"program's is over {prog.total_steps}, so the resumed run differs from an uninterrupted one")
    # The schedule's length goes with every checkpoint, so that a resumed run is compiled with the same schedule.
    run_meta = {"total_steps": prog.total_steps}
    history = TrainLog()
    tokens_per_step = prog.batch * prog.seq
    clock, last_logged = time.perf_counter(), start
    step = start
    try:
        while step < steps and (stop_after is None or step - start < stop_after):
            batch = {"tokens": data.batch(step, prog.batch, prog.seq + 1)}
            state, metrics = prog.train_step(state, batch)
            step += 1
            scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
            history.steps.append(step)
            history.metrics.append(scalars)
            if metrics_path is not None:
                with open(metrics_path, "a") as out:
                    out.write(json.dumps({"step": step, **scalars}) + "\n")
            if "expert_load" in metrics:
                history.expert_loads.append(np.asarray(metrics["expert_load"]))
            for observer in observers:
                observer.on_step(step, scalars)
            if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
                measured = evaluate(state)
                history.evals.append((step, measured))
                say("  ".join([f"eval at step {step}", *(f"{k} {v:.4f}" for k, v in measured.items())]))
                if metrics_path is not None:
                    with open(metrics_path, "a") as out:
                        out.write(json.dumps({"step": step, **measured}) + "\n")
                for observer in observers:
                    observer.on_eval(step, measured)
            if step % log_every == 0 or step == steps:
                now = time.perf_counter()
                rate = tokens_per_step * (step - last_logged) / max(now - clock, 1e-9)
                clock, last_logged = now, step
                say(_progress_line(step, steps, scalars, rate, history.expert_load))
            if ckpt is not None and step % save_every == 0:
                save_checkpoint(ckpt, state, step, {**run_meta, **_data_meta(data)})
    except KeyboardInterrupt:
        if ckpt is not None and step > start:
            jax.block_until_ready(state)
            save_checkpoint(ckpt, state, step, {**run_meta, **_data_meta(data)})
            say(f"interrupted: saved step {step} to {ckpt}")
        raise
    if ckpt is not None and step > start and step % save_every:
        save_checkpoint(ckpt, state, step, {**run_meta, **_data_meta(data)})
    history.final_state = state
    return history


def _data_meta(data: BatchSource) -> dict[str, Any]:
    """The data position to store with a checkpoint, for sources that have one."""
    get_state = getattr(data, "get_state", None)
    return {"data_state": get_state()} if get_state is not None else {}


def _restore_data(data: BatchSource, meta: dict[str, Any], found: Path) -> None:
    """Puts a source with a position of its own back where the checkpoint's run left it."""
    set_state = getattr(data, "set_state", None)
    if set_state is None:
        return
    if "data_state" not in meta:
        raise UserError(f"checkpoint {found} holds no data position (it was trained on another kind of data)")
    set_state(meta["data_state"])


def _progress_line(step: int, steps: int, m: dict[str, float], tokens_per_s: float, load: np.ndarray | None) -> str:
    parts = [f"step {step:>6}/{steps}", f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}"]
    if m.get("mtp_loss"):
        parts.append(f"mtp {m['mtp_loss']:.4f}")
    if m.get("balance_loss"):
        parts.append(f"bal {m['balance_loss']:.2e}")
    if load is not None:
        parts.append(f"load max/mean {load_balance(load).mean():.2f}")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    return "  ".join(parts)
