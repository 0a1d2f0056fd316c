"""Decoding in bf16 at batch >= 2 on the CPU. XLA:CPU has no bf16 x bf16 -> f32 kernel for the batched dots its
YNNPACK fusion declines (the latent attention's probs . c_kv over keys once the batch is not 1), so these programs
used to fail at run time with `Unsupported element type for DotThunk::Execute`; batch 1 always ran. A batch must
continue each of its prompts exactly as decoding that prompt alone does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import dsv3c

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.dsv3"
PROMPTS = [[5, 17, 3, 99, 42], [200, 1, 64, 9, 31]]  # one length: one jit compile per batch size
NEW_TOKENS = 6
SEQ = 16


def test_bf16_batched_greedy_decoding_equals_one_prompt_at_a_time():
    """A batch of 2 runs, and each row's greedy tokens are the tokens the program generates from that prompt alone
    (a decode program's batch follows the prompts it is given; ragged batches are `tests/test_decode.py`'s). The
    naive-cache pipeline never hit the bug: its dots all suit YNNPACK at these shapes."""
    text = TINY.read_text()
    assert "compute f32" in text
    spec = dsv3c.parse(text.replace("compute f32", "compute bf16"), str(TINY))  # params stay f32
    prog = dsv3c.prepare(spec, mode="decode", batch=len(PROMPTS), seq=SEQ)
    params = prog.init_params(seed=3)
    alone = [np.asarray(prog.generate(params, [prompt], NEW_TOKENS))[0] for prompt in PROMPTS]
    tokens = np.asarray(prog.generate(params, PROMPTS, NEW_TOKENS))
    assert tokens.shape == (len(PROMPTS), NEW_TOKENS)
    np.testing.assert_array_equal(tokens, np.stack(alone))
