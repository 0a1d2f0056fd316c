"""The pipelined training step: one SPMD program over the mesh's `pipe` axis that runs a schedule's tick tables.

Inside `shard_map` over `pipe` (the other mesh axes stay with XLA's partitioner, so fsdp, tensor and expert sharding
work inside each stage as they do without pipelining), every rank runs the same `lax.scan` over the ticks of
`runtime/pipeline_ticks.py`. At each tick a `lax.switch` on the rank's entry picks the unit: a chunk's forward
(`jax.vjp` of the chunk, its residuals saved in a slot), its backward (the saved VJP applied to the gradient that
came back), the weights' half of a split backward, or DualPipeV's forward and backward pair, which one branch holds so
that XLA can overlap the two. Then activations go one way and gradients the other with `ppermute`, and land in the
slots the tables name. The chunks are cut from `@model` as `dsv3-pipeline` marked it: the first also runs what comes
before the first layer stack (the embedding), the last's backward first runs what comes after the last stack (head,
losses, MTP) forward and backward on the output its forward kept. The stacks' per-layer outputs (balance losses,
expert loads) travel with the hidden state, each chunk filling its layers' rows, so the last chunk sees them whole.

The step's loss is the mean of the micro-batches' losses (a metric is their mean too, a router-bias load their
sum), as gradient accumulation computes it; with equal micro-batches and per-token means it is the unpipelined loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import BlockArgument, Operation, SSAValue

from ..dialects import dsv3
from ..dialects.pipeline import split_main_model
from ..frontend.errors import UserError
from .lower import LoweringContext
from .lower.registry import lower_ops, lower_region_block
from .lower.remat import remat_policy
from .lower.sharding import partition_spec
from .lower.weights import cast_keeping_gradient_dtype
from .model import ModelOutputs, model_func
from .pipeline_ticks import TickTables, Unit, build_tables
from .stages import PIPE_AXIS, StackStages, StageLayout, check_pipeline

Payload = tuple[jax.Array, tuple[tuple[jax.Array, ...], ...]]
"""What flows between chunks: the hidden state and, per stack, its per-layer outputs (all layers' rows)."""


class _Model:
    """`@model` cut into what the chunks evaluate, and the functions that evaluate each part."""

    def __init__(self, module: ModuleOp, layout: StageLayout, mesh: Any, explicit: bool):
        self.module, self.layout, self.mesh, self.explicit = module, layout, mesh, explicit
        block = model_func(module).body.block
        self.tokens = block.args[0]
        stacks, prologue, epilogue = split_main_model(block)
        self.prologue = _slice(prologue, {stacks[0].operands[0]})
        self.epilogue = [op for op in epilogue if op is not block.last_op]
        self.stacks = layout.stacks
        self.context = _slice(prologue, _free_values(stacks) - set(stacks[0].operands))
        self.epilogue_context = _slice(prologue, _free_values(self.epilogue))
        self.specs = {op.pname: partition_spec(op.sharding) if op.sharding is not None else PartitionSpec()
                      for op in dsv3.walk_params(module)}
        self.roles: dict[str, dsv3.OutputRole] = {}
        self.rates: dict[str, float] = {}

    def stage_mesh(self) -> Any:
        """The mesh a stage's ops see inside `shard_map` (`pipe` manual), or None when no other axis splits
        anything (each rank then runs its chunks as on one device)."""
        if self.mesh is None:
            return None
        mesh = jax.sharding.get_abstract_mesh()
        return None if all(size == 1 for name, size in mesh.shape.items() if name != PIPE_AXIS) else mesh

    def placed(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Parameters (or their gradients) of a stage constrained to their shardings inside it, as `dsv3-shard`
        wrote them: the weight gradients a chunk's backward accumulates are then split like the weights (left to
        propagation, XLA:TPU kept a whole [layers, experts, ...] f32 gradient per device)."""
        mesh = self.stage_mesh()
        if mesh is None:
            return values
        return {n: lax.with_sharding_constraint(v, NamedSharding(mesh, self.specs[n])) for n, v in values.items()}

    def context_for(self, params: dict[str, jax.Array]) -> LoweringContext:
        return LoweringContext.for_module(self.module, params, mesh=self.stage_mesh(), explicit=self.explicit)

    def embed(self, flat: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
        """What the first stack takes: the prologue's result (the embedding)."""
        ctx = self.context_for(flat)
        ctx.env[self.tokens] = tokens
        lower_ops(self.prologue, ctx)
        _no_outputs(ctx, "before the first layer stack")
        return ctx.env[self.stacks[0].op.operands[0]]

    def chunk(self, local: int, live: jax.Array, first: jax.Array, rows: dict[str, jax.Array],
              flat: dict[str, jax.Array], payload: Payload, tokens: jax.Array) -> Payload:
        """The layers of the rank's `local`-th chunk: per stack, `live[s]` layers from the band's rows, written into
        the per-layer outputs from row `first[s]`."""
        ctx = self.context_for(flat)
        ctx.env[self.tokens] = tokens
        lower_ops(self.context, ctx)
        hidden, side = payload
        side = list(side)
        for s, stack in enumerate(self.stacks):
            if stack.width[local] == 0:
                continue
            hidden, per_layer = _masked_scan(stack, hidden, [rows[n] for n in stack.params], live[s], ctx)
            side[s] = tuple(lax.dynamic_update_slice_in_dim(whole, part, first[s], 0)
                            for whole, part in zip(side[s], per_layer, strict=True))
        _no_outputs(ctx, "inside a layer stack")
        return hidden, tuple(side)

    def head(self, flat: dict[str, jax.Array], payload: Payload, tokens: jax.Array):
        """The epilogue on the last chunk's output: (weighted loss, (metrics, router-bias loads))."""
        ctx = self.context_for(flat)
        ctx.env[self.tokens] = tokens
        lower_ops(self.epilogue_context, ctx)
        hidden, side = payload
        ctx.env[self.stacks[-1].op.results[0]] = hidden
        for stack, outputs in zip(self.stacks, side, strict=True):
            for result, whole in zip(stack.op.results[1:], outputs, strict=True):
                ctx.env[result] = whole[: stack.count]
        lower_ops(self.epilogue, ctx)
        loss = jnp.zeros((), jnp.float32)
        grouped: dict[str, list[jax.Array]] = {}
        for out in ctx.outputs:
            grouped.setdefault(out.name, []).append(out.value)
            self.roles.setdefault(out.name, out.role)
            if out.role in dsv3.LOSS_ROLES:
                loss = loss + out.weight * out.value
        metrics = {name: sum(values[1:], values[0]) / len(values) for name, values in grouped.items()}
        per_token = {n for n, r in self.roles.items() if r in (dsv3.OutputRole.LOGITS, dsv3.OutputRole.HIDDEN)}
        metrics = {k: v for k, v in metrics.items() if k not in per_token}
        loads = {}
        for name, load, rate in ctx.bias_updates:
            loads[name] = load
            self.rates[name] = rate
        return loss, (metrics, loads)


def _no_outputs(ctx: LoweringContext, where: str) -> None:
    if ctx.outputs or ctx.bias_updates:
        raise UserError(f"a pipelined model has outputs {where}; the pipeline lowering reads them after the last one")


def _masked_scan(stack: StackStages, hidden: jax.Array, weights: list[jax.Array], live: jax.Array,
                 ctx: LoweringContext) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`lax.scan` over a band's rows, running the first `live` as layers (with the stack's recompute policy) and
    passing the hidden state through the rest."""
    block = stack.op.body.block

    def run(h, layer_params, ctx=ctx):
        out, *per_layer = lower_region_block(block, [h, *layer_params], ctx)
        return out, tuple(per_layer)

    # A weight whose gradient keeps the compute dtype (`runtime/lower/weights.py`) is cast before the conditional,
    # not inside it: the branches' gradients must agree on dtypes, and the skipping branch's zeros would be f32.
    ctx.weight_casts = {}
    shapes = jax.eval_shape(run, hidden, tuple(w[0] for w in weights))[1]
    casts = {arg.index - 1: dtype for arg, dtype in ctx.weight_casts.items()
             if isinstance(arg, BlockArgument) and arg.block is block}
    ctx.weight_casts = None
    inside = dataclasses.replace(ctx, grads_in_compute_dtype=False)

    def skip(h, layer_params):
        return h, tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    def masked(h, layer_params, active):
        layer_params = tuple(cast_keeping_gradient_dtype(w, casts[i]) if i in casts else w
                             for i, w in enumerate(layer_params))
        return lax.cond(active, partial(run, ctx=inside), skip, h, layer_params)

    # The checkpoint goes around the conditional, not inside it: a checkpoint's residuals are its inputs, and the
    # scan then reads a layer's weights back from the band instead of stacking a copy of them (which the residuals
    # of a conditional would be). Without a recompute policy on the stack, everything is saved, as a plain scan does.
    saving = stack.op.remat is not None and stack.op.remat.data != "none"
    policy = remat_policy(block) if saving else jax.checkpoint_policies.everything_saveable
    masked = jax.checkpoint(masked, policy=policy, prevent_cse=False)

    def layer(h, xs):
        index, layer_params = xs
        return masked(h, layer_params, index < live)

    return lax.scan(layer, hidden, (jnp.arange(weights[0].shape[0]), tuple(weights)))


def _defined_inside(value: SSAValue, root: Operation) -> bool:
    op = value.block.parent_op() if isinstance(value, BlockArgument) else value.owner
    while op is not None:
        if op is root:
            return True
        op = op.parent_op()
    return False


def _free_values(ops: Iterable[Operation]) -> set[SSAValue]:
    """Values the ops (and their regions) read that none of them defines."""
    ops = list(ops)
    free: set[SSAValue] = set()
    for root in ops:
        for op in root.walk():
            free.update(v for v in op.operands if not _defined_inside(v, root))
    defined = {r for op in ops for r in op.results}
    return free - defined


def _slice(candidates: list[Operation], needed: set[SSAValue]) -> list[Operation]:
    """The ops of `candidates` that the values `needed` depend on, in order."""
    needed = set(needed)
    chosen = []
    for op in reversed(candidates):
        if any(r in needed for r in op.results):
            chosen.append(op)
            needed |= _free_values([op])
    return chosen[::-1]


def _payload_shapes(model: _Model, slabs: dict[str, jax.Array], flat: dict[str, jax.Array],
                   tokens: jax.Array) -> Payload:
    """Shapes of the activation payload, from the prologue and one layer of each stack."""
    hidden = jax.eval_shape(model.embed, flat, tokens)
    side = []
    for stack in model.stacks:
        def one(h, layer_params, stack=stack):
            ctx = model.context_for(flat)
            ctx.env[model.tokens] = tokens
            lower_ops(model.context, ctx)
            _, *per_layer = lower_region_block(stack.op.body.block, [h, *layer_params], ctx)
            return tuple(per_layer)

        layer = tuple(jax.ShapeDtypeStruct(slabs[n].shape[1:], slabs[n].dtype) for n in stack.params)
        rows = stack.count + max(stack.width)  # room for a band's padded rows past the last layer
        side.append(tuple(jax.ShapeDtypeStruct((rows, *s.shape), s.dtype)
                          for s in jax.eval_shape(one, hidden, layer)))
    return hidden, tuple(side)


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _cond_or_zeros(pred: jax.Array, fn: Callable[[], Any]) -> Any:
    """`fn()` where `pred` holds, zeros of its shapes and dtypes elsewhere (gradients may come back in the compute
    dtype, so the zeros take the dtypes `fn` returns)."""
    return lax.cond(pred, fn, lambda: _zeros(jax.eval_shape(fn)))


def _add_rows(whole: jax.Array, rows: jax.Array, first: int) -> jax.Array:
    """`whole` with `rows` added to its rows from `first` on, as an update of those rows in place (a scatter-add,
    what `.at[...].add` lowers to, wrote a new buffer of the whole accumulator)."""
    band = lax.slice_in_dim(whole, first, first + rows.shape[0]) + rows.astype(whole.dtype)
    return lax.dynamic_update_slice_in_dim(whole, band, first, 0)


def _read(buffers: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, slot, 0, keepdims=False), buffers)


def _write(buffers: Any, slot: jax.Array, value: Any) -> Any:
    return jax.tree.map(lambda b, v: lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), slot, 0), buffers, value)


def make_pipelined_value_and_grad(module: ModuleOp, layout: StageLayout, mesh: Any, explicit: bool) -> Callable:
    """(state, tokens) -> ((loss, ModelOutputs), gradients), as `runtime/train.py` expects, with the stacked
    parameters (and their gradients) in the stage layout of `runtime/stages.py`."""
    model = _Model(module, layout, mesh, explicit)
    tables = build_tables(layout.schedule)
    staged = layout.staged_names()
    microbatches = layout.schedule.microbatches

    def value_and_grad(state, tokens):
        params = {**state["params"], **state["router_bias"]}
        check_pipeline(layout, dict(mesh.shape) if mesh is not None else {}, tokens.shape[0], explicit)
        slabs = {n: v for n, v in params.items() if n in staged}
        flat = {n: v for n, v in params.items() if n not in staged}
        body = partial(_ranks_program, model, tables, microbatches)
        specs = PartitionSpec(PIPE_AXIS)
        run = jax.shard_map(
            body, mesh=mesh, axis_names={PIPE_AXIS}, check_vma=False,
            in_specs=({n: specs for n in slabs}, {n: PartitionSpec() for n in flat}, PartitionSpec()),
            out_specs=({n: specs for n in slabs}, {n: PartitionSpec() for n in flat}, PartitionSpec(),
                       PartitionSpec(), PartitionSpec()),
        )
        g_slabs, g_flat, loss, metrics, loads = run(slabs, flat, tokens)
        grads = {n: g.astype(state["params"][n].dtype)
                 for n, g in {**g_slabs, **g_flat}.items() if n in state["params"]}
        # the router-bias update applies to the biases as the state holds them: staged
        out = ModelOutputs(loss, metrics, layout.stage_params(loads), tuple(model.rates.items()),
                           tuple(model.roles.items()))
        return (loss, out), grads

    return value_and_grad


def _ranks_program(model: _Model, tables: TickTables, microbatches: int, slabs: dict[str, jax.Array],
                   flat: dict[str, jax.Array], tokens: jax.Array):
    """One rank's view (inside shard_map over `pipe`): the tick loop, then the sums over ranks."""
    layout, schedule = model.layout, tables.schedule
    ranks, locals_ = layout.ranks, layout.local_chunks
    rank = lax.axis_index(PIPE_AXIS)
    slabs = {n: v[0] for n, v in slabs.items()}
    batch, width = tokens.shape
    per_mb = tokens.reshape(batch // microbatches, microbatches, width)

    def tokens_of(m):
        return lax.dynamic_index_in_dim(per_mb, m, axis=1, keepdims=False)

    # static per (rank, local chunk) facts, as arrays indexed by the traced rank
    chunk_of = np.array([[layout.chunk(r, k) for k in range(locals_)] for r in range(ranks)])
    live = jnp.asarray([[[st.layers[c] for st in model.stacks] for c in row] for row in chunk_of], jnp.int32)
    first = jnp.asarray([[[st.first[c] for st in model.stacks] for c in row] for row in chunk_of], jnp.int32)
    is_first = jnp.asarray(chunk_of == 0)
    is_last = jnp.asarray(chunk_of == schedule.num_chunks - 1)

    def rows_of(local):
        return model.placed({n: slabs[n][st.offset[local]: st.offset[local] + st.width[local]]
                             for st in model.stacks for n in st.params})

    payload_shape = _payload_shapes(model, slabs, flat, tokens_of(0))
    residuals: dict[int, tuple[Any, list[int]]] = {}  # local chunk -> (treedef, per leaf: known index or -1)

    def forward_vjp(local: int, m, x: Payload):
        """The chunk's output and the VJP residuals to keep: those that are not inputs the backward has anyway
        (weights, the received activation, the tokens)."""
        rows, tok = rows_of(local), tokens_of(m)
        fn = partial(model.chunk, local, live[rank, local], first[rank, local])
        out, vjp = jax.vjp(lambda r, fl, xx: fn(r, fl, xx, tok), rows, flat, x)
        known = [*jax.tree.leaves((rows, flat, x)), tok]
        leaves, treedef = jax.tree.flatten(vjp)
        where = [next((i for i, k in enumerate(known) if k is leaf), -1) for leaf in leaves]
        residuals[local] = (treedef, where)
        return out, [leaf for leaf, i in zip(leaves, where, strict=True) if i < 0]

    def saved_vjp(local: int, m, x: Payload, stored: list[jax.Array]):
        treedef, where = residuals[local]
        known = [*jax.tree.leaves((rows_of(local), flat, x)), tokens_of(m)]
        stored = iter(stored)
        return treedef.unflatten([known[i] if i >= 0 else next(stored) for i in where])

    res_shapes = [jax.eval_shape(lambda x, k=k: forward_vjp(k, 0, x)[1], _zeros(payload_shape))
                  for k in range(locals_)]
    head_shapes = jax.eval_shape(model.head, flat, _zeros(payload_shape), tokens_of(0))[1]
    trash_act, trash_grad = tables.act_slots, tables.grad_slots

    def slots(n, tree):
        return jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), tree)

    carry = {
        "acts": slots(trash_act + 1, payload_shape),
        "grads": slots(trash_grad + 1, payload_shape),
        "res": [slots(max(n, 1), shapes) for n, shapes in zip(tables.res_slots, res_shapes, strict=True)],
        # the gradient accumulators are split like the parameters (left to propagation, a loop carry's sharding
        # need not be: the update then re-shards every gradient, an all-to-all and a copy of each)
        "g_slabs": model.placed(_zeros(slabs)),
        "g_flat": model.placed(_zeros(flat)),
        "loss": jnp.zeros((), jnp.float32),
        "metrics": _zeros(head_shapes[0]),
        "loads": _zeros(head_shapes[1]),
    }
    nothing = _zeros(payload_shape)
    scale = 1.0 / microbatches

    def slot(value, trash):
        return jnp.where(value < 0, trash, value)

    def by_chunk(local, branches):
        return branches[0]() if locals_ == 1 else lax.switch(local, branches)

    def forward(c, e, embedded):
        """The forward of (local chunk, micro-batch) on the carry `c` (chunk 0 takes `embedded`): the updated
        activation slots and residual pools, and the output to send."""
        local, m = e["f_chunk"], e["f_mb"]
        received = _read(c["acts"], slot(e["f_act"], trash_act))
        starts = is_first[rank, local]
        x = (jnp.where(starts, embedded, received[0]),
             jax.tree.map(lambda v: jnp.where(starts, jnp.zeros_like(v), v), received[1]))

        def run(k):
            def go():
                out, stored = forward_vjp(k, m, x)
                pools = list(c["res"])
                pools[k] = [lax.dynamic_update_index_in_dim(p, v, slot(e["f_res"], 0), 0)
                            for p, v in zip(pools[k], stored, strict=True)]
                return out, pools
            return go

        out, pools = by_chunk(local, [run(k) for k in range(locals_)])
        acts = _write(c["acts"], slot(e["f_act"], trash_act), x)
        acts = _write(acts, slot(e["f_out"], trash_act), out)
        return {"acts": acts, "res": pools}, out

    def backward(c, e, inputs: bool, weights: bool, from_loss):
        """The backward of (local chunk, micro-batch): the input's gradient when `inputs`, the weights' when
        `weights` (both for a whole backward); the last chunk's output gradient is `from_loss`. Returns the carry
        entries it changes and the gradient w.r.t. the chunk's input."""
        local, m = e["b_chunk"], e["b_mb"]
        x = _read(c["acts"], slot(e["b_act"], trash_act))
        g = _read(c["grads"], slot(e["b_grad"], trash_grad))
        if inputs:
            g = jax.tree.map(lambda a, b: jnp.where(is_last[rank, local], a, b), from_loss, g)

        def run(k):
            def go():
                stored = [lax.dynamic_index_in_dim(p, slot(e["b_res"], 0), 0, keepdims=False) for p in c["res"][k]]
                g_rows, g_flat, g_x = saved_vjp(k, m, x, stored)(g)
                g_rows, g_flat = model.placed(g_rows), model.placed(g_flat)
                if not weights:
                    return c["g_slabs"], c["g_flat"], g_x
                g_slabs = dict(c["g_slabs"])
                for st in model.stacks:
                    for n in st.params:
                        if st.width[k]:
                            g_slabs[n] = _add_rows(g_slabs[n], g_rows[n], st.offset[k])
                return model.placed(g_slabs), model.placed(jax.tree.map(jnp.add, c["g_flat"], g_flat)), g_x
            return go

        g_slabs, g_flat, g_x = by_chunk(local, [run(k) for k in range(locals_)])
        changed = {"g_slabs": g_slabs, "g_flat": g_flat}
        if inputs:
            changed["grads"] = _write(c["grads"], slot(e["b_grad"], trash_grad), g)
        return changed, g_x

    def unit_branch(kind: Unit):
        """A tick's work for one kind of unit. A pair's backward reads the carry as it was before its forward
        wrote, so nothing orders the two: XLA may run them side by side."""
        def go(c, e, embedded, from_loss):
            new, f_send, g_x = dict(c), nothing, nothing
            if kind in (Unit.F, Unit.FB, Unit.FB_SPLIT):
                changed, f_send = forward(c, e, embedded)
                new.update(changed)
            if kind not in (Unit.F, Unit.IDLE):
                inputs = kind != Unit.W
                weights = kind in (Unit.B, Unit.FB, Unit.W)
                changed, g_x = backward(c, e, inputs, weights, from_loss)
                new.update(changed)
            return new, f_send, g_x
        return go

    kinds = sorted({Unit(int(k)) for k in np.unique(tables.unit)})
    branch_of = np.zeros(len(Unit), np.int32)
    for i, kind in enumerate(kinds):
        branch_of[kind] = i
    branches = [unit_branch(kind) for kind in kinds]
    names = ("f_chunk", "f_mb", "b_chunk", "b_mb", "f_act", "f_out", "f_res", "b_act", "b_out", "b_grad", "b_res")
    xs = {n: jnp.asarray(getattr(tables, n)) for n in names}
    xs["branch"] = jnp.asarray(branch_of[tables.unit])
    xs["unit"] = jnp.asarray(tables.unit)
    xs["recv_act"], xs["recv_grad"] = jnp.asarray(tables.recv_act), jnp.asarray(tables.recv_grad)
    input_backwards = jnp.asarray([k in (Unit.B, Unit.B_SPLIT, Unit.FB, Unit.FB_SPLIT) for k in Unit])

    def tick(c, row):
        """One tick: the loss head if this rank's backward starts at the last chunk (once, outside the branches),
        the embedding, the unit's branch, the embedding's backward, then the exchange."""
        e = {n: jnp.maximum(v[rank], 0) if n in ("f_chunk", "f_mb", "b_chunk", "b_mb") else v[rank]
             for n, v in row.items()}
        m_f, m_b = e["f_mb"], e["b_mb"]
        heads = input_backwards[e["unit"]] & is_last[rank, e["b_chunk"]]
        tails = input_backwards[e["unit"]] & is_first[rank, e["b_chunk"]]

        def from_loss():
            y = _read(c["acts"], slot(e["b_out"], trash_act))
            loss, vjp, aux = jax.vjp(lambda fl, yy: model.head(fl, yy, tokens_of(m_b)), flat, y, has_aux=True)
            g_flat, g_y = vjp(jnp.asarray(scale, jnp.float32))
            return g_y, g_flat, loss, aux

        g_y, g_head, loss, aux = _cond_or_zeros(heads, from_loss)
        # The embedding is a gather and its backward a scatter-add: cheap enough to run at every tick (its result
        # used where the unit starts or ends at chunk 0), which keeps its sharded values out of a conditional.
        embedded = model.embed(flat, tokens_of(m_f))
        c, f_send, g_x = lax.switch(e["branch"], branches, c, e, embedded, g_y)
        _, embed_vjp = jax.vjp(lambda fl: model.embed(fl, tokens_of(m_b)), flat)
        (g_embed,) = embed_vjp(jnp.where(tails, g_x[0], jnp.zeros_like(g_x[0])))
        c["g_flat"] = model.placed(jax.tree.map(lambda a, b, d: a + b.astype(a.dtype) + d.astype(a.dtype),
                                                c["g_flat"], g_head, g_embed))
        c["loss"] = c["loss"] + loss
        c["metrics"] = jax.tree.map(jnp.add, c["metrics"], aux[0])
        c["loads"] = jax.tree.map(jnp.add, c["loads"], aux[1])
        for i, delta in enumerate(tables.act_channels):
            arrived = f_send if delta == 0 else _shift(f_send, delta, ranks)
            c["acts"] = _write(c["acts"], e["recv_act"][i], arrived)
        for i, delta in enumerate(tables.grad_channels):
            arrived = g_x if delta == 0 else _shift(g_x, delta, ranks)
            c["grads"] = _write(c["grads"], e["recv_grad"][i], arrived)
        return c, None

    carry, _ = lax.scan(tick, carry, xs)
    g_slabs = {n: v[None] for n, v in carry["g_slabs"].items()}
    g_flat = lax.psum(carry["g_flat"], PIPE_AXIS)
    loss = lax.psum(carry["loss"], PIPE_AXIS) * scale
    metrics = jax.tree.map(lambda v: lax.psum(v, PIPE_AXIS) * scale, carry["metrics"])
    loads = lax.psum(carry["loads"], PIPE_AXIS)
    return g_slabs, g_flat, loss, metrics, loads


def _shift(tree: Any, delta: int, ranks: int) -> Any:
    """Sends every rank's `tree` to rank + delta (mod ranks)."""
    perm = [(r, (r + delta) % ranks) for r in range(ranks)]
    return jax.tree.map(lambda v: lax.ppermute(v, PIPE_AXIS, perm), tree)

