"""The training loop behind `dsv3c train`: data, steps, progress, checkpoints and resumption."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from ..frontend.errors import UserError
from .checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint


class BatchSource(Protocol):
    def batch(self, step: int, batch: int, length: int) -> np.ndarray: ...


@dataclass
class TrainLog:
    """Per-step scalar metrics and expert loads ([MoE layers, experts] per step) of a run, and its final state."""

    steps: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    expert_loads: list[np.ndarray] = field(default_factory=list)
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
) -> TrainLog:
    """Trains `prog` (a train-mode Program) up to `steps` total steps. With `resume`, continues from the latest
    checkpoint in `ckpt`. `stop_after` ends the run early after that many steps of this call (to simulate an
    interruption). `metrics_path` gets one JSON line of scalar metrics per step. A KeyboardInterrupt saves the
    last completed step before re-raising."""
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
            if step % log_every == 0 or step == steps:
                now = time.perf_counter()
                rate = tokens_per_step * (step - last_logged) / max(now - clock, 1e-9)
                clock, last_logged = now, step
                say(_progress_line(step, steps, scalars, rate, history.expert_load))
            if ckpt is not None and step % save_every == 0:
                save_checkpoint(ckpt, state, step, run_meta)
    except KeyboardInterrupt:
        if ckpt is not None and step > start:
            jax.block_until_ready(state)
            save_checkpoint(ckpt, state, step, run_meta)
            say(f"interrupted: saved step {step} to {ckpt}")
        raise
    if ckpt is not None and step > start and step % save_every:
        save_checkpoint(ckpt, state, step, run_meta)
    history.final_state = state
    return history


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
