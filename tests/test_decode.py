"""Decoding with the KV cache: greedy generation against transformers' `generate`, absorbed against naive attention
step by step, cached steps against the uncached forward pass, and the cache size the report states."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3c
from dsv3c.dialects.text import parse_ir, print_ir
from dsv3c.runtime.decode import Decoder, cache_infos, init_caches, kv_cache_report

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ATOL = 1e-4
NAIVE = "dsv3-drop-mtp,dsv3-kv-cache"


@pytest.fixture(scope="module", autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _prompts(ref) -> list[np.ndarray]:
    """The batch transformers generated from, without its left padding."""
    return [row[mask.astype(bool)] for row, mask in zip(ref["batch_prompts"], ref["batch_mask"], strict=True)]


@pytest.mark.parametrize("variant", ["interleave", "yarn"])
def test_greedy_generation_equals_transformers(variant):
    """Token for token, for one prompt and for a batch of prompts of lengths 5, 9 and 3 (left-padded together)."""
    spec, params = dsv3c.import_hf(FIXTURES / variant)
    ref = np.load(FIXTURES / variant / "reference.npz")
    prog = dsv3c.prepare(spec, mode="decode", batch=3, seq=48)  # generate jits its own loop: no AOT step
    assert "dsv3-mla-absorb" in prog.pipeline
    np.testing.assert_array_equal(prog.generate(params, ref["prompt"][0], 32), ref["greedy"])
    np.testing.assert_array_equal(prog.generate(params, _prompts(ref), 32), ref["batch_greedy"])


def test_absorbed_and_naive_decoding_agree_at_every_step():
    """A 64-token greedy generation (a batch of three prompts of different lengths) with the latent cache and with
    per-head keys and values: the same tokens, and logits equal to 1e-4 at every step."""
    spec, params = dsv3c.import_hf(FIXTURES / "interleave")
    prompts = _prompts(np.load(FIXTURES / "interleave" / "reference.npz"))
    absorbed = dsv3c.prepare(spec, mode="decode", batch=3, seq=16)
    naive = dsv3c.prepare(spec, mode="decode", batch=3, seq=16, pipeline=NAIVE)
    assert set(cache_infos(absorbed.module)) == {"positions", "dense.c_kv", "dense.k_pe", "moe.c_kv", "moe.k_pe"}
    assert set(cache_infos(naive.module)) == {"positions", "dense.k_nope", "dense.k_pe", "dense.v", "moe.k_nope",
                                              "moe.k_pe", "moe.v"}
    a = absorbed.generate(params, prompts, 64, return_logits=True)
    b = naive.generate(params, prompts, 64, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.logits.shape == (3, 64, 128)
    np.testing.assert_allclose(a.logits, b.logits, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    """`tiny` (MoE with routing groups, MTP dropped) with random weights: a forward and a decode program."""
    fwd = dsv3c.compile(EXAMPLES / "tiny.dsv3", mode="forward", batch=1, seq=8)
    prog = dsv3c.prepare(EXAMPLES / "tiny.dsv3", mode="decode", batch=2, seq=8)
    return fwd, prog, fwd.init_params(seed=3)


def test_cached_steps_equal_the_uncached_forward_pass(tiny):
    """Each decode step's logits are the full forward pass's logits at that position: the cache holds exactly what
    recomputing the prefix would give, per sequence of a ragged batch."""
    fwd, prog, params = tiny
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    out = prog.generate(params, prompts, 12, return_logits=True)
    for row, prompt in enumerate(prompts):
        sequence = np.array([prompt + list(out.tokens[row])], np.int32)
        full = np.asarray(fwd.forward(params, sequence))[0]
        np.testing.assert_allclose(out.logits[row], full[len(prompt) - 1: -1], atol=ATOL, rtol=0)
    # the forward pass of a decode program is a prefill into fresh caches: the same logits as forward mode
    tokens = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
    np.testing.assert_allclose(prog.forward(params, tokens), fwd.forward(params, tokens), atol=ATOL, rtol=0)


def test_sampling_and_eos(tiny):
    _, prog, params = tiny
    hot = prog.generate(params, [1, 2, 3], 16, temperature=5.0, seed=7)
    assert hot.shape == (1, 16) and ((0 <= hot) & (hot < 256)).all()
    np.testing.assert_array_equal(hot, prog.generate(params, [1, 2, 3], 16, temperature=5.0, seed=7))
    assert not np.array_equal(hot, prog.generate(params, [1, 2, 3], 16, temperature=5.0, seed=8))
    greedy = prog.generate(params, [1, 2, 3], 16)
    eos = int(greedy[0, 3])
    stopped = prog.generate(params, [1, 2, 3], 16, eos_id=eos)
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], greedy[0, : first + 1])
    assert (stopped[0, first:] == eos).all()


def test_report_gives_the_671b_cache_size():
    """Decode mode on the full model (shapes only): 61 layers x (512 + 64) x 2 bytes (bf16) = 70,272 bytes per
    token, beside the naive per-head figure 61 x 128 x (128 + 64 + 128) x 2; without absorption the program caches
    per-head keys and values (sharing the one rope key), and the report says so."""
    absorbed = dsv3c.compile(EXAMPLES / "deepseek-v3-671b.dsv3", mode="decode", batch=1, seq=1024)
    r = absorbed.report
    assert r["kv_cache_bytes_per_token"] == 61 * 576 * 2 == 70_272
    assert r["kv_cache_bytes_per_token_latent"] == 70_272
    assert r["kv_cache_bytes_per_token_naive"] == 61 * 128 * 320 * 2 == 4_997_120
    # one token over a cache of 1024: 2 x 37.5B active weights, plus latent attention over 1024 keys per layer
    attention = 2 * 61 * 1024 * 128 * (2 * 512 + 64)
    assert r["flops_per_step"] == pytest.approx(2 * 37.55e9 - 2 * 129280 * 7168 + attention, rel=2e-3)
    naive = dsv3c.compile(EXAMPLES / "deepseek-v3-671b.dsv3", mode="decode", batch=1, seq=1024, pipeline=NAIVE)
    assert naive.report["kv_cache_bytes_per_token"] == 61 * (128 * (128 + 128) + 64) * 2


def test_cached_ir_round_trips_and_decode_needs_a_cache(tmp_path):
    prog = dsv3c.compile(EXAMPLES / "tiny.dsv3", mode="prefill", batch=1, seq=8)
    text = print_ir(prog.module)
    assert print_ir(parse_ir(text)) == text
    path = tmp_path / "cached.mlir"
    path.write_text(text)
    again = dsv3c.compile(path, mode="decode", batch=2, seq=8, pipeline="")
    assert again.report["kv_cache_bytes_per_token"] == prog.report["kv_cache_bytes_per_token"] == 4 * 40 * 4
    with pytest.raises(dsv3c.UserError, match="needs the dsv3-kv-cache pass"):
        dsv3c.compile(EXAMPLES / "tiny.dsv3", mode="decode", batch=1, seq=8, pipeline="dsv3-drop-mtp")


SPECULATIVE = "dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache"


def test_speculative_decoding_with_the_mtp_draft():
    """The checkpoint's MTP layer drafts one token ahead: the cached draft function gives transformers' MTP logits,
    and speculative generation gives exactly transformers' greedy tokens, with the draft acceptance counted."""
    spec, params = dsv3c.import_hf(FIXTURES / "interleave")
    ref = np.load(FIXTURES / "interleave" / "reference.npz")
    prog = dsv3c.prepare(spec, mode="decode", batch=3, seq=48, pipeline=SPECULATIVE)
    assert kv_cache_report(prog.module)["kv_cache_bytes_per_token_mtp_draft"] == 1 * (16 + 4) * 4  # latent form

    decoder = Decoder(prog.module)
    tokens = jnp.asarray(ref["tokens"])
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    @jax.jit
    def draft_logits(params):
        caches = init_caches(decoder.caches, batch, length)
        logits, hidden, caches = decoder.main_step(params, caches, tokens, positions, 0)
        return decoder.draft_step(params, caches, hidden[:, :-1], tokens[:, 1:], positions[:, :-1], 0)[0]

    np.testing.assert_allclose(draft_logits(params), ref["mtp_logits"], atol=ATOL, rtol=0)

    out = prog.generate(params, _prompts(ref), 32, speculative=True)
    np.testing.assert_array_equal(out.tokens, ref["batch_greedy"])
    assert 0 < out.drafts_checked <= 3 * 31 and 0 <= out.drafts_accepted <= out.drafts_checked
    with pytest.raises(dsv3c.UserError, match="needs the MTP draft"):
        dsv3c.prepare(spec, mode="decode", batch=1, seq=8).generate(params, [1, 2], 4, speculative=True)
