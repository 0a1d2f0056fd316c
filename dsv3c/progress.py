"""What a person watches during `dsv3c train`: a progress bar, a live line while XLA compiles, TensorBoard event
files, and a plot of the curves at the end.

The bar and the live line draw on standard error only when it is a terminal (a log file gets the loop's plain
lines, never carriage returns); TensorBoard (tensorboardX) and the plot (matplotlib) are optional dependencies,
imported only when asked for."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .frontend.errors import UserError


def _terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def live_line(label: str, log: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """While the block runs (a compile of up to minutes), a terminal shows `label` and the seconds so far on one
    line. Yields the `log` to use meanwhile: it clears that line before each message."""
    if not _terminal():
        yield log
        return
    done, lock = threading.Event(), threading.Lock()
    start = time.perf_counter()

    def tick() -> None:
        while not done.wait(0.5):
            with lock:
                sys.stderr.write(f"\r{label} ... {time.perf_counter() - start:.0f}s\033[K")
                sys.stderr.flush()

    def say(message: str) -> None:
        with lock:
            sys.stderr.write("\r\033[K")
            log(message)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield say
    finally:
        done.set()
        thread.join()
        sys.stderr.write("\r\033[K")


class ProgressBar:
    """`[#####-----] 120/200 60%  loss 3.2104  9,812 tok/s  ETA 0:00:12` redrawn on one terminal line."""

    def __init__(self, steps: int, tokens_per_step: int, width: int = 24):
        self.steps, self.tokens_per_step, self.width = steps, tokens_per_step, width
        self.first: tuple[int, float] | None = None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)  # the first step includes warm-up: rates count from it
            return
        done_steps, seconds = step - self.first[0], now - self.first[1]
        rate = done_steps / max(seconds, 1e-9)
        eta = (self.steps - step) / max(rate, 1e-9)
        filled = int(self.width * step / self.steps)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(
            f"\r[{bar}] {step}/{self.steps} {step / self.steps:4.0%}  loss {metrics['loss']:.4f}  "
            f"{rate * self.tokens_per_step:,.0f} tok/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}\033[K"
        )
        sys.stderr.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


class TensorBoard:
    """Scalars as TensorBoard event files: `train/<metric>` per step, `eval/<metric>` per evaluation."""

    def __init__(self, directory: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs tensorboardX: pip install 'dsv3c[watch]'") from None
        self.writer = SummaryWriter(str(directory))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def printer(observers: list[Any]) -> Any:
    """`print` for the run's log lines that first clears a progress bar's line, so that a line printed between two
    redraws of the bar starts at the left margin instead of after the bar."""
    bars = [o for o in observers if isinstance(o, ProgressBar)]

    def say(message: str) -> None:
        for bar in bars:
            bar.close()
        print(message, flush=True)

    return say


def observers_for(steps: int, tokens_per_step: int, tensorboard: str | None) -> list[Any]:
    """The watchers a `train` invocation asked for: the bar on a terminal, TensorBoard with a directory."""
    observers: list[Any] = [ProgressBar(steps, tokens_per_step)] if _terminal() else []
    if tensorboard:
        observers.append(TensorBoard(tensorboard))
    return observers


def check_plotting() -> None:
    """Refuses `--plot` before a run when matplotlib is missing, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'dsv3c[watch]'") from None


def plot_curves(history: Any, path: str | Path) -> None:
    """A PNG of the training loss per step (and the LM loss), with the held-out loss at each evaluation."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history.steps, history.losses(), label="train loss", linewidth=1)
    ax.plot(history.steps, [m["lm_loss"] for m in history.metrics], label="train lm loss", linewidth=1)
    if history.evals:
        ax.plot([s for s, _ in history.evals], [m["eval_loss"] for _, m in history.evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
