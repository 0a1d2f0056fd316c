"""Training on CPU: the loss falls, checkpoints resume bit for bit, the bias update balances experts, data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dsv3c
from dsv3c.runtime.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from dsv3c.runtime.data import SyntheticStream, TokenFile
from dsv3c.runtime.loop import load_balance, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = (EXAMPLES / "tiny.dsv3").read_text()


@pytest.fixture(scope="module")
def tiny_prog():
    return dsv3c.compile(EXAMPLES / "tiny.dsv3", batch=16, seq=64, steps=200)


def test_tiny_trains_to_well_under_half_its_start_loss(tiny_prog):
    history = train(tiny_prog, 200, SyntheticStream(256, seed=0))
    start = np.mean(history.losses()[:5])
    end = np.mean(history.losses()[-5:])
    assert start == pytest.approx(np.log(256) * 1.3 + 2 * 1e-4 * 1.0, rel=0.05)  # lm + 0.3 mtp at chance level
    assert end < 0.4 * start, (start, end)
    assert history.metrics[-1]["lm_loss"] < 0.4 * history.metrics[0]["lm_loss"]


def test_resume_continues_with_bit_identical_losses(tmp_path):
    prog = dsv3c.compile(EXAMPLES / "tiny.dsv3", batch=4, seq=32, steps=24)
    data = SyntheticStream(256, seed=3)
    straight = train(prog, 24, data, seed=1)
    ckpt = tmp_path / "ckpt"
    first = train(prog, 24, data, seed=1, ckpt=ckpt, save_every=5, stop_after=12)
    assert first.steps[-1] == 12
    assert latest_checkpoint(ckpt).name == "step_00000012"
    resumed = train(prog, 24, data, seed=1, ckpt=ckpt, resume=True, save_every=5)
    assert resumed.steps == list(range(13, 25))
    assert first.losses() + resumed.losses() == straight.losses()  # exact equality, not approx
    final_straight = straight.final_state["params"]["embed"]
    np.testing.assert_array_equal(np.asarray(resumed.final_state["params"]["embed"]), np.asarray(final_straight))


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_prog, monkeypatch):
    state = tiny_prog.init_state(0)
    save_checkpoint(tmp_path, state, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dsv3c.runtime.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, state, 2)
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "step_00000001"
    restored, meta = restore_checkpoint(found, tiny_prog.abstract_state())
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["params"]["embed"]), np.asarray(state["params"]["embed"]))


def _mean_balance(history, last: int = 30) -> float:
    """max/mean expert load averaged over the MoE layers and the last `last` steps."""
    return float(np.mean([load_balance(load) for load in history.expert_loads[-last:]]))


def test_bias_update_balances_expert_load():
    balances = {}
    for rate in ("0.01", "0.0"):
        text = TINY.replace("bias_rate 0.01, seq_aux 0.0001", f"bias_rate {rate}, seq_aux 0.0")
        prog = dsv3c.compile(dsv3c.parse(text), batch=16, seq=64, steps=150)
        balances[rate] = _mean_balance(train(prog, 150, SyntheticStream(256, seed=0)))
    print("max/mean expert load, bias update on / off:", balances)
    assert balances["0.01"] < balances["0.0"] - 0.05, balances


def test_bias_update_rule_moves_towards_mean_load(tiny_prog):
    """One step from a known state: b += rate * sign(mean - load) for exactly the biases the IR names."""
    state = tiny_prog.init_state(0)
    before = {k: np.asarray(v) for k, v in state["router_bias"].items()}
    tokens = SyntheticStream(256, 0).batch(0, 16, 65)
    state, metrics = tiny_prog.train_step(state, {"tokens": tokens})
    load = np.asarray(metrics["expert_load"])
    expected = before["moe.router_bias"] + 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(np.asarray(state["router_bias"]["moe.router_bias"]), expected, rtol=0, atol=1e-7)
    assert load.sum(-1).tolist() == [16 * 64 * 2] * 3  # every token chooses top_k = 2 experts in each MoE layer


def test_token_file_batches_and_errors(tmp_path):
    stream = np.arange(1000) % 256
    np.save(tmp_path / "ok.npy", stream.astype(np.int64))
    data = TokenFile(tmp_path / "ok.npy", vocab=256, seed=0)
    batch = data.batch(7, 3, 10)
    assert batch.shape == (3, 10) and batch.dtype == np.int32
    assert all(((row[1:] - row[:-1]) % 256 == 1).all() for row in batch)  # contiguous windows of the stream
    np.testing.assert_array_equal(batch, data.batch(7, 3, 10))

    np.save(tmp_path / "floats.npy", np.zeros(10, np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.save(tmp_path / "big.npy", np.array([1, 2, 300]))
    cases = {
        "missing.npy": "no such file",
        "floats.npy": "token ids must be integers",
        "junk.npy": "is not a readable .npy array",
        "big.npy": "outside the vocabulary [0, 256)",
    }
    for name, message in cases.items():
        with pytest.raises(dsv3c.UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
            TokenFile(tmp_path / name, vocab=256)
