"""`dsv3-kv-cache`: turns `@model` into one step of cached inference (prefill or decode).

Before: `func.func @model(%tokens)` reads a [B, S+1] token batch, derives positions 0..S-1, and attends causally
within the batch. After: `func.func @model(%tokens, %positions, %slot)` reads S new tokens [B, S] at the given
positions [B, S] (negative for padding), writes this step's keys into the caches at sequence index `%slot`, and
attends over everything cached so far, masked by position. Prefill is a call with the prompt (`%slot` 0); decode a
call with one token per sequence. Only the `logits` (and `hidden`) outputs are kept (losses, loads and bias updates
are training matters); MTP modules still in `@model`, which only fed losses, go with them. A draft `@mtp(%hidden,
%next_tokens)` made by `dsv3-mtp-draft` gets `%positions` and `%slot` and caches of its own (`mtp.positions`,
`mtp.0.block.c_kv`, ...) the same way.

What is cached follows from the attention form the IR has:
- after `dsv3-mla-absorb`, `dsv3.latent_attention` reads `c_kv` and `k_pe`: those are cached (C + r per token and
  layer, 576 for V3);
- the naive `dsv3.attention` reads per-head `k_nope`, `v` and the shared `k_pe`: those are cached
  (H * (n + v) + r, 32,832 for V3), and the op becomes `dsv3.masked_attention`.
Each per-layer cache is a `dsv3.cache` stacked over the layers and threaded through the layer stack; a `positions`
cache [B, T] (filled with -1, so empty slots are masked) records which position each slot holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerType, ModuleOp, TensorType
from xdsl.dialects.func import FuncOp
from xdsl.ir import Block, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from ..dialects import dsv3
from ..dialects.cache import BATCH_AXIS, SEQ_AXIS, CacheOp, CacheStoreOp, CacheUpdateOp
from ..dialects.latent import LatentAttentionOp, MaskedAttentionOp
from ..frontend.errors import UserError
from .dce import DeadCodeElimination

I32 = IntegerType(32)
DYN = dsv3.DYN

# what each attention form reads from its keys, with the logical axes of one token's entry
_LATENT_KEYS = {"c_kv": (2, ("kv_lora",)), "k_pe": (3, ("kv_rope",))}
_NAIVE_KEYS = {"k_nope": (2, ("heads", "kv_nope")), "k_pe": (3, ("kv_rope",)), "v": (4, ("heads", "kv_v"))}


def _func(module: ModuleOp, name: str) -> FuncOp | None:
    return next((op for op in module.ops if isinstance(op, FuncOp) and op.sym_name.data == name), None)


def _cache_decl(name: str, axes: tuple[str, ...], shape: list[int], dtype, fill: int | None = None) -> CacheOp:
    return CacheOp(name, axes, TensorType(dtype, shape), fill)


def _stack_prefix(stack: dsv3.LayerStackOp) -> str:
    """The parameter prefix of a layer stack (`moe.`, `dense.`): its caches are named alike."""
    for operand in stack.operands[1:]:
        if isinstance(operand.owner, dsv3.ParamOp):
            return operand.owner.pname.rsplit(".", 1)[0] + "."
    return f"{stack.layer_kind.data}."


def _attention_of(block: Block) -> Operation | None:
    found = [op for op in block.ops if isinstance(op, dsv3.AttentionOp | LatentAttentionOp)]
    if len(found) > 1:
        raise UserError("dsv3-kv-cache: a layer with more than one attention is not supported")
    return found[0] if found else None


def _thread_caches(
    stack: dsv3.LayerStackOp, slot: SSAValue, positions: SSAValue, key_positions: SSAValue
) -> None:
    """Adds one stacked cache per key tensor of the stack's attention: declared before the stack, updated in the
    region, yielded, returned stacked and stored."""
    block = stack.body.block
    attention = _attention_of(block)
    if attention is None:
        return
    keys = _LATENT_KEYS if isinstance(attention, LatentAttentionOp) else _NAIVE_KEYS
    count, prefix = stack.int_prop("count"), _stack_prefix(stack)
    decls: list[CacheOp] = []
    updated: dict[str, SSAValue] = {}
    for local, (index, axes) in keys.items():
        value = attention.operands[index]
        ty = value.type
        assert isinstance(ty, TensorType)
        entry = list(dsv3.shape_of(value)[2:])
        decl = _cache_decl(prefix + local, ("layers", BATCH_AXIS, SEQ_AXIS, *axes), [count, DYN, DYN, *entry],
                           ty.element_type)
        decl.result.name_hint = f"{prefix}{local}_cache".replace(".", "_")
        Rewriter.insert_op(decl, InsertPoint.before(stack))
        decls.append(decl)
        arg = block.insert_arg(ty, len(block.args))
        arg.name_hint = f"{local}_cache"
        update = CacheUpdateOp(arg, value, slot)
        update.result.name_hint = f"{local}_all"
        Rewriter.insert_op(update, InsertPoint.before(attention))
        updated[local] = update.result

    if isinstance(attention, LatentAttentionOp):
        attention.operands = [attention.q_lat, attention.q_pe, updated["c_kv"], updated["k_pe"], positions,
                              key_positions]
    else:
        assert isinstance(attention, dsv3.AttentionOp)
        masked = MaskedAttentionOp(
            attention.q_nope, attention.q_pe, updated["k_nope"], updated["k_pe"], updated["v"], positions,
            key_positions, attention.float_prop("scale"),
        )
        Rewriter.replace_op(attention, masked)

    terminator = block.last_op
    assert isinstance(terminator, dsv3.YieldOp)
    Rewriter.replace_op(terminator, dsv3.YieldOp([*terminator.operands, *updated.values()]))
    old_results = list(stack.results)
    result_types = [r.type for r in old_results] + [d.result.type for d in decls]
    region = stack.detach_region(stack.body)
    new_stack = dsv3.LayerStackOp(
        stack.operands[0], [*stack.operands[1:], *(d.result for d in decls)], region, count, stack.layer_kind.data,
        result_types,
    )
    Rewriter.insert_op(new_stack, InsertPoint.before(stack))
    for old, new in zip(old_results, new_stack.results, strict=False):
        new.name_hint = old.name_hint
        old.replace_all_uses_with(new)
    for decl, result in zip(decls, new_stack.results[len(old_results):], strict=True):
        result.name_hint = decl.cname.replace(".", "_") + "_next"
    Rewriter.erase_op(stack)
    stores = [
        CacheStoreOp(result, decl.cname)
        for decl, result in zip(decls, new_stack.results[len(old_results):], strict=True)
    ]
    Rewriter.insert_op(stores, InsertPoint.after(new_stack))


@dataclass(frozen=True)
class KVCache(ModulePass):
    """Rewrites `@model` (and the MTP draft `@mtp`, when `dsv3-mtp-draft` made one) into cached inference steps."""

    name = "dsv3-kv-cache"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        model = _func(op, "model")
        if model is None:
            raise UserError("dsv3-kv-cache: the module has no func.func @model")
        block = model.body.block
        if len(block.args) != 1:
            raise UserError("dsv3-kv-cache: @model must take only the token batch (has the pass run already?)")
        tokens = block.args[0]
        inference = (dsv3.OutputRole.LOGITS, dsv3.OutputRole.HIDDEN)
        for inner in list(block.ops):
            if isinstance(inner, dsv3.TokenWindowOp) and inner.int_prop("offset") == 0:
                inner.ids.replace_all_uses_with(tokens)
            elif isinstance(inner, dsv3.OutputOp) and inner.output_role not in inference:
                Rewriter.erase_op(inner)
            elif isinstance(inner, dsv3.BiasUpdateOp):
                Rewriter.erase_op(inner)
        DeadCodeElimination().apply(ctx, op)
        if any(isinstance(o, dsv3.TokenWindowOp) for o in block.ops):
            raise UserError("dsv3-kv-cache: the logits depend on a shifted token window; only offset 0 is cached")
        _cache_function(model, "positions")
        draft = _func(op, "mtp")
        if draft is not None:
            _cache_function(draft, "mtp.positions")


def _cache_function(func: FuncOp, positions_cache: str) -> None:
    """Appends `%positions` and `%slot` to `func`'s arguments, reads positions from them, and threads a cache
    through each layer stack; `positions_cache` names the record of which position each slot holds."""
    block = func.body.block
    positions = block.insert_arg(TensorType(I32, [DYN, DYN]), len(block.args))
    positions.name_hint = "positions"
    slot = block.insert_arg(TensorType(I32, []), len(block.args))
    slot.name_hint = "slot"
    func.update_function_type()
    for inner in list(block.ops):
        if isinstance(inner, dsv3.PositionsOp):
            inner.result.replace_all_uses_with(positions)
            Rewriter.erase_op(inner)
    first = block.first_op
    assert first is not None
    key_pos = _cache_decl(positions_cache, (BATCH_AXIS, SEQ_AXIS), [DYN, DYN], I32, fill=-1)
    key_pos.result.name_hint = positions_cache.replace(".", "_") + "_cache"
    update = CacheUpdateOp(key_pos.result, positions, slot)
    update.result.name_hint = "key_positions"
    store = CacheStoreOp(update.result, positions_cache)
    Rewriter.insert_op([key_pos, update, store], InsertPoint.before(first))
    for stack in [o for o in block.ops if isinstance(o, dsv3.LayerStackOp)]:
        _thread_caches(stack, slot, positions, update.result)
