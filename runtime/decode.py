"""The inference runtime of a cached `@model` (after `dsv3-kv-cache`): caches, one step, and generation.

A step is `@model(tokens [B,S], positions [B,S], slot)` with the caches as state: it returns the logits of the S
tokens and the updated caches. Generation is one jitted function: allocate the caches for prompt + new tokens,
prefill the (left-padded) prompts in one step, then a `lax.fori_loop` of single-token decode steps, each writing its
keys into the next cache slot. Left padding keeps one write slot for the whole batch; the pads get position -1, so
no query ever sees them, and each sequence's positions start at 0 at its first real token, so a padded prompt
generates exactly what it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from xdsl.dialects.builtin import ModuleOp
from xdsl.dialects.func import FuncOp

from ..dialects.cache import BATCH_AXIS, SEQ_AXIS, cache_decls
from ..dialects.dsv3 import UNIQUE_ROLES, OutputRole
from ..frontend.errors import UserError
from .lower import LoweringContext, lower_block
from .lower.dtypes import result_dtype
from .model import model_func

Caches = dict[str, jax.Array]


@dataclass(frozen=True)
class CacheInfo:
    """What the IR declares about one cache; `shape` has -1 where batch and cache length go."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str, ...]
    fill: int

    def concrete(self, batch: int, length: int) -> tuple[int, ...]:
        sizes = {BATCH_AXIS: batch, SEQ_AXIS: length}
        return tuple(sizes.get(axis, dim) for axis, dim in zip(self.axes, self.shape, strict=True))

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies (all layers of a stacked cache)."""
        dims = [d for axis, d in zip(self.axes, self.shape, strict=True) if axis not in (BATCH_AXIS, SEQ_AXIS)]
        return math.prod(dims) * self.dtype.itemsize


def function(module: ModuleOp, name: str) -> FuncOp | None:
    """`func.func @name` of the module (`model`, or the MTP draft `mtp`), or None."""
    return next((op for op in module.ops if isinstance(op, FuncOp) and op.sym_name.data == name), None)


def cache_infos(module: ModuleOp, func: str | None = None) -> dict[str, CacheInfo]:
    """Every cache the module declares (or only function `func`'s), by name."""
    root = module if func is None else function(module, func)
    return {
        op.cname: CacheInfo(op.cname, tuple(op.result.type.get_shape()), np.dtype(result_dtype(op.result)),
                            op.axis_names, op.fill_value)
        for op in (cache_decls(root) if root is not None else [])
    }


def kv_cache_bytes_per_token(module: ModuleOp, func: str = "model") -> int:
    """Bytes of keys and values `func` caches per token per sequence, over all layers (position records
    excluded)."""
    infos = cache_infos(module, func).values()
    return sum(info.bytes_per_token for info in infos if not np.issubdtype(info.dtype, np.integer))


def init_caches(infos: dict[str, CacheInfo], batch: int, length: int) -> Caches:
    """Empty caches for `batch` sequences of up to `length` tokens."""
    return {name: jnp.full(i.concrete(batch, length), i.fill, i.dtype) for name, i in infos.items()}


def abstract_caches(infos: dict[str, CacheInfo], batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(i.concrete(batch, length), i.dtype) for name, i in infos.items()}


def run_function(
    module: ModuleOp,
    name: str,
    params: dict[str, jax.Array],
    caches: Caches,
    args: Sequence[jax.Array],
    mesh: jax.sharding.Mesh | None = None,
    explicit: bool = False,
) -> tuple[dict[OutputRole, jax.Array], Caches]:
    """Traces function `name` of a cached module on `args`: its outputs of the unique roles (logits, hidden state),
    by role, and the caches after it."""
    func = function(module, name)
    assert func is not None, name
    block = func.body.block
    if len(block.args) != len(args):
        raise UserError(f"@{name} takes {len(block.args)} arguments, not {len(args)}: has dsv3-kv-cache run?")
    ctx = LoweringContext.for_module(module, params, mesh=mesh, explicit=explicit, caches=dict(caches))
    for arg, value in zip(block.args, args, strict=True):
        ctx.env[arg] = value
    lower_block(block, ctx)
    return {out.role: out.value for out in ctx.outputs if out.role in UNIQUE_ROLES}, {**caches, **ctx.cache_stores}


def run_step(
    module: ModuleOp,
    params: dict[str, jax.Array],
    caches: Caches,
    tokens: jax.Array,
    positions: jax.Array,
    slot: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    explicit: bool = False,
) -> tuple[jax.Array, Caches]:
    """Traces one cached step of `@model`: float32 logits [B, S, vocab] and the caches after it."""
    if len(model_func(module).body.block.args) != 3:
        raise UserError("this IR has no KV cache: run the dsv3-kv-cache pass (decode and prefill modes do)")
    args = (tokens, positions, jnp.asarray(slot, jnp.int32))
    outputs, caches = run_function(module, "model", params, caches, args, mesh, explicit)
    return outputs[OutputRole.LOGITS].astype(jnp.float32), caches


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one [B, P] array, right-aligned, and each row's number of pads [B]."""
    array = np.asarray(prompts, dtype=object if not isinstance(prompts, np.ndarray | jax.Array) else None)
    if array.ndim == 1 and not isinstance(array.flat[0] if array.size else None, Sequence | np.ndarray):
        rows = [np.asarray(prompts, np.int32)]  # one flat prompt
    else:
        rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not rows or any(r.size == 0 for r in rows):
        raise UserError("every prompt needs at least one token")
    width = max(r.size for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, width - r.size:] = r
    return ids, np.array([width - r.size for r in rows], np.int32)


@dataclass(frozen=True)
class Generation:
    """Generated token ids [B, N]; with `return_logits`, the float32 logits each was chosen from [B, N, vocab];
    with speculative decoding, how many MTP drafts the main model accepted out of how many it checked."""

    tokens: np.ndarray
    logits: np.ndarray | None = None
    drafts_accepted: int | None = None
    drafts_checked: int | None = None

    @property
    def acceptance_rate(self) -> float | None:
        if not self.drafts_checked:
            return None
        return self.drafts_accepted / self.drafts_checked


class Decoder:
    """Jitted inference over one cached module: `step`, `forward` (a prefill from empty caches) and `generate`."""

    def __init__(self, module: ModuleOp, mesh: jax.sharding.Mesh | None = None, explicit: bool = False):
        self.module = module
        self.mesh = mesh
        self.explicit = explicit
        self.caches = cache_infos(module)
        if not self.caches:
            raise UserError("this IR has no KV cache: run the dsv3-kv-cache pass (decode and prefill modes do)")
        self._step = jax.jit(self._step_fn, donate_argnums=1)
        self._forward = jax.jit(self._forward_fn)
        self._generate = jax.jit(self._generate_fn, static_argnames=("max_new", "logits"))
        self.has_draft = function(module, "mtp") is not None
        if self.has_draft:
            from .speculative import speculative_generate

            self._speculative = jax.jit(partial(speculative_generate, self), static_argnames=("max_new",))

    def main_step(self, params, caches, tokens, positions, slot):
        """`@model` on S tokens: (logits [B,S,V] f32, last hidden states [B,S,D] or None, caches) (traceable)."""
        outputs, caches = run_function(self.module, "model", params, caches, (tokens, positions, slot), self.mesh,
                                       self.explicit)
        return outputs[OutputRole.LOGITS].astype(jnp.float32), outputs.get(OutputRole.HIDDEN), caches

    def draft_step(self, params, caches, hidden, next_tokens, positions, slot):
        """`@mtp`: logits [B,S,V] of the token after `next_tokens`, and the caches (traceable)."""
        outputs, caches = run_function(self.module, "mtp", params, caches, (hidden, next_tokens, positions, slot),
                                       self.mesh, self.explicit)
        return outputs[OutputRole.LOGITS].astype(jnp.float32), caches

    def _step_fn(self, params, caches, tokens, positions, slot):
        return run_step(self.module, params, caches, tokens, positions, slot, self.mesh, self.explicit)

    def _forward_fn(self, params, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return self._step_fn(params, init_caches(self.caches, batch, length), tokens, positions, 0)[0]

    def step(self, params, caches: Caches, tokens, positions, slot: int) -> tuple[jax.Array, Caches]:
        """One step; `caches` are donated (use the returned ones)."""
        return self._step(params, caches, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                          jnp.asarray(slot, jnp.int32))

    def forward(self, params, tokens) -> jax.Array:
        """float32 logits [B, S, vocab] of a whole sequence (a prefill into fresh caches)."""
        return self._forward(params, jnp.asarray(tokens, jnp.int32))

    def lower(self, params: dict[str, Any], batch: int, seq: int, mode: str):
        """The prefill step (S = seq) or the decode step (S = 1, a cache of seq tokens), from shapes alone."""
        new = seq if mode == "prefill" else 1
        tokens = jax.ShapeDtypeStruct((batch, new), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        return self._step.lower(params, abstract_caches(self.caches, batch, seq), tokens, tokens, scalar)

    def _generate_fn(self, params, ids, pads, key, temperature, eos_id, *, max_new: int, logits: bool):
        """Temperature and stop token are traced (-1: none), so changing them does not recompile."""
        batch, prompt = ids.shape
        caches = init_caches(self.caches, batch, prompt + max_new)
        positions = jnp.arange(prompt, dtype=jnp.int32)[None, :] - pads[:, None]
        positions = jnp.where(positions >= 0, positions, -1)
        step_logits, caches = self._step_fn(params, caches, ids, positions, 0)
        choose = partial(_choose, temperature=temperature)
        key, sub = jax.random.split(key)
        first_logits = step_logits[:, -1]
        first = choose(first_logits, sub)
        out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(first)
        all_logits = jnp.zeros((batch, max_new, first_logits.shape[-1]) if logits else (0,), jnp.float32)
        if logits:
            all_logits = all_logits.at[:, 0].set(first_logits)
        done = first == eos_id
        lengths = prompt - pads

        def body(i, carry):
            caches, out, all_logits, done, key = carry
            token = out[:, i]
            pos = (lengths + i)[:, None]
            step_logits, caches = self._step_fn(params, caches, token[:, None], pos, prompt + i)
            key, sub = jax.random.split(key)
            nxt = choose(step_logits[:, -1], sub)
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
            out = out.at[:, i + 1].set(nxt)
            if logits:
                all_logits = all_logits.at[:, i + 1].set(step_logits[:, -1])
            return caches, out, all_logits, done, key

        _, out, all_logits, _, _ = lax.fori_loop(0, max_new - 1, body, (caches, out, all_logits, done, key))
        return out, all_logits

    def generate(
        self,
        params: dict[str, Any],
        prompts: Sequence[Sequence[int]] | np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        eos_id: int | None = None,
        pad_id: int = 0,
        return_logits: bool = False,
        speculative: bool = False,
    ) -> Generation:
        """Continues each prompt by `max_new_tokens` tokens: greedy at temperature 0, else sampled from
        softmax(logits / temperature). After `eos_id`, a sequence repeats it. `speculative` drafts one token ahead
        with the MTP module (`@mtp`, from the `dsv3-mtp-draft` pass) and verifies it with the main model, greedy
        only: the tokens are the greedy ones, in fewer main-model steps when drafts are accepted."""
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if temperature < 0:
            raise UserError("temperature must be >= 0")
        ids, pads = left_pad(prompts, pad_id)
        if speculative:
            if not self.has_draft:
                raise UserError("speculative decoding needs the MTP draft: compile with the dsv3-mtp-draft pass "
                                "(e.g. -p dsv3-mtp-draft,dsv3-mla-absorb,dsv3-kv-cache)")
            if temperature != 0 or eos_id is not None or return_logits:
                raise UserError("speculative decoding is greedy only (no temperature, eos_id or return_logits)")
            out, accepted, checked = self._speculative(params, jnp.asarray(ids), jnp.asarray(pads),
                                                       max_new=int(max_new_tokens))
            return Generation(np.asarray(out), drafts_accepted=int(accepted), drafts_checked=int(checked))
        out, logits = self._generate(
            params, jnp.asarray(ids), jnp.asarray(pads), jax.random.key(seed), jnp.float32(temperature),
            jnp.int32(-1 if eos_id is None else eos_id), max_new=int(max_new_tokens), logits=bool(return_logits),
        )
        return Generation(np.asarray(out), np.asarray(logits) if return_logits else None)


def _choose(logits: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """Greedy at temperature 0, else a sample of softmax(logits / temperature)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def kv_cache_report(module: ModuleOp) -> dict[str, int]:
    """KV-cache bytes per token (one sequence, all layers) of the compiled program, beside the two textbook
    figures for the same attention shapes: `naive` caches full per-head keys and values, H * (n + r + v) values per
    layer (40,960 for V3), `latent` the absorbed form's C + r (576). Elements have the compute dtype of the
    attention output."""
    from ..dialects import dsv3

    naive = latent = 0
    for stack in model_func(module).walk():
        if not isinstance(stack, dsv3.LayerStackOp):
            continue
        params = {o.owner.pname.rsplit(".", 1)[-1]: o.owner for o in stack.operands[1:]
                  if isinstance(o.owner, dsv3.ParamOp)}
        attention = next((op for op in stack.body.walk() if op.name.endswith("attention")), None)
        if attention is None or "wkv_a" not in params or "wkv_b" not in params:
            continue
        count = stack.int_prop("count")
        _, latent_width, up_width = dsv3.shape_of(params["wkv_b"].result)
        rope = dsv3.shape_of(params["wkv_a"].result)[-1] - latent_width
        heads = dsv3.shape_of(attention.operands[1])[2]  # q_pe [B, S, H, r] in every attention form
        itemsize = np.dtype(result_dtype(attention.results[0])).itemsize
        naive += count * (up_width + heads * rope) * itemsize
        latent += count * (latent_width + rope) * itemsize
    report = {"kv_cache_bytes_per_token_naive": naive, "kv_cache_bytes_per_token_latent": latent}
    if cache_decls(model_func(module)):
        report["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(module)
    if cache_infos(module, "mtp"):
        report["kv_cache_bytes_per_token_mtp_draft"] = kv_cache_bytes_per_token(module, "mtp")
    return report


def attention_flops(module: ModuleOp, batch: int, queries: int, context: int) -> float:
    """FLOPs of the cached attention cores for `queries` new tokens per sequence over `context` cached ones
    (causal within the step, as `report.model_flops` counts a full sequence): 2 per multiply-add, per key
    H * (2C + r) in the latent form (scores over c_kv and k_pe, then the average of c_kv), H * (n + r + v) naive."""
    from ..dialects import dsv3
    from ..dialects.latent import LatentAttentionOp, MaskedAttentionOp

    pairs = queries * (context - queries) + queries * queries / 2
    total = 0.0
    for stack in model_func(module).walk():
        if not isinstance(stack, dsv3.LayerStackOp):
            continue
        for op in stack.body.walk():
            if isinstance(op, LatentAttentionOp):
                *_, heads, latent = dsv3.shape_of(op.q_lat)
                width = 2 * latent + dsv3.shape_of(op.q_pe)[-1]
            elif isinstance(op, MaskedAttentionOp):
                *_, heads, nope = dsv3.shape_of(op.q_nope)
                width = nope + dsv3.shape_of(op.q_pe)[-1] + dsv3.shape_of(op.v)[-1]
            else:
                continue
            total += 2.0 * stack.int_prop("count") * batch * pairs * heads * width
    return total
