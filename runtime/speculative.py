"""Greedy speculative decoding with the MTP module as the draft (REFERENCE.md section 4; depth 1).

Each main-model step reads two tokens, the last accepted one and the MTP draft of the next: its greedy choice after
the first either confirms the draft (then the choice after the draft comes free: two tokens from one step) or
replaces it (one token, and the draft's cache entries are invalidated by setting their position to -1, so no later
query sees them). The MTP module then drafts again from the main model's hidden states and its greedy choices at
both positions. Both streams write two cache slots per step; a row's positions advance by one or two. Every row
produces exactly the main model's greedy tokens; acceptance only changes how many steps that takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from .decode import init_caches

if TYPE_CHECKING:
    from .decode import Decoder

POSITION_CACHES = ("positions", "mtp.positions")


def speculative_generate(decoder: Decoder, params, ids, pads, *, max_new: int):
    """(tokens [B, max_new], drafts accepted, drafts checked) for left-padded prompts `ids` [B, P] (traceable)."""
    batch, prompt = ids.shape
    caches = init_caches(decoder.caches, batch, prompt + 2 * max_new + 2)
    positions = jnp.arange(prompt, dtype=jnp.int32)[None, :] - pads[:, None]
    positions = jnp.where(positions >= 0, positions, -1)
    logits, hidden, caches = decoder.main_step(params, caches, ids, positions, 0)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # the MTP stream at position i reads token i+1: the prompt's own, and the main model's choice after the last
    next_tokens = jnp.concatenate([ids[:, 1:], greedy[:, -1:]], axis=1)
    draft_logits, caches = decoder.draft_step(params, caches, hidden, next_tokens, positions, 0)
    last = greedy[:, -1]
    draft = jnp.argmax(draft_logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((batch, max_new + 1), jnp.int32).at[:, 0].set(last)
    rows = jnp.arange(batch)
    zero = jnp.zeros((), jnp.int32)
    state = (caches, out, jnp.ones((batch,), jnp.int32), last, draft, prompt - pads, jnp.int32(prompt), zero, zero)

    def more(state) -> jax.Array:
        return jnp.min(state[2]) < max_new

    def step(state):
        caches, out, count, last, draft, pos, slot, accepted, checked = state
        tokens, where = jnp.stack([last, draft], axis=1), jnp.stack([pos, pos + 1], axis=1)
        logits, hidden, caches = decoder.main_step(params, caches, tokens, where, slot)
        chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, 2]: after `last`, after `draft`
        accept = chosen[:, 0] == draft
        draft_logits, caches = decoder.draft_step(params, caches, hidden, chosen, where, slot)
        drafts = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
        out = out.at[rows, count].set(chosen[:, 0], mode="drop")  # equals the draft when accepted
        out = out.at[rows, jnp.where(accept, count + 1, max_new + 1)].set(chosen[:, 1], mode="drop")
        caches = dict(caches)
        for name in POSITION_CACHES:  # a rejected draft's slot holds nothing any query may see
            caches[name] = caches[name].at[:, slot + 1].set(jnp.where(accept, pos + 1, -1))
        active = count < max_new
        accepted = accepted + jnp.sum(accept & active)
        checked = checked + jnp.sum(active)
        step_ = accept.astype(jnp.int32)
        return (caches, out, count + 1 + step_, jnp.where(accept, chosen[:, 1], chosen[:, 0]),
                jnp.where(accept, drafts[:, 1], drafts[:, 0]), pos + 1 + step_, slot + 2, accepted, checked)

    _, out, _, _, _, _, _, accepted, checked = lax.while_loop(more, step, state)
    return out[:, :max_new], accepted, checked
