"""What a person watches: the progress bar's line, TensorBoard event files and the loss plot, from a made-up run
(no model is compiled here)."""

from __future__ import annotations

import io

import pytest

from dsv3c import progress
from dsv3c.runtime.loop import TrainLog


def test_progress_bar_shows_steps_rate_loss_and_eta(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    clock = iter([100.0, 102.0])  # two seconds between steps 1 and 11
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.ProgressBar(steps=21, tokens_per_step=1000, width=10)
    bar.on_step(1, {"loss": 5.0})
    bar.on_step(11, {"loss": 3.25})
    line = err.getvalue().split("\r")[-1]
    # 10 steps in 2 s: 5 steps/s, 5,000 tok/s; 10 steps left: 2 s
    assert line.startswith("[#####-----] 11/21  52%  loss 3.2500  5,000 tok/s  ETA 00:00:02"), line


def _history() -> TrainLog:
    log = TrainLog()
    for step in range(1, 21):
        log.steps.append(step)
        log.metrics.append({"loss": 6.0 - step * 0.1, "lm_loss": 5.0 - step * 0.1})
    log.evals = [(10, {"eval_loss": 5.5, "eval_ppl": 244.7}), (20, {"eval_loss": 5.0, "eval_ppl": 148.4})]
    return log


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    progress.plot_curves(_history(), tmp_path / "loss.png")
    data = (tmp_path / "loss.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000 and not list(tmp_path.glob("*.tmp.png"))


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.event_file_writer import event_pb2  # the record format TensorBoard reads

    board = progress.TensorBoard(tmp_path)
    for step, metrics in zip(_history().steps, _history().metrics, strict=True):
        board.on_step(step, metrics)
    board.on_eval(20, {"eval_loss": 5.0})
    board.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    raw, found, at = events.read_bytes(), {}, 0
    while at < len(raw):  # TFRecord framing: length (8), its CRC (4), the record, its CRC (4)
        length = int.from_bytes(raw[at : at + 8], "little")
        event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
        at += 16 + length
        for value in event.summary.value:
            found[(value.tag, event.step)] = value.simple_value
    assert found[("train/loss", 20)] == pytest.approx(4.0)
    assert found[("eval/loss", 20)] == pytest.approx(5.0)
