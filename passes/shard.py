"""`dsv3-shard`: places the program on a device mesh.

Every parameter carries logical axis names (`embed`, `mlp`, `exp`, ...); an ordered rule table maps them to mesh
axes, the way MaxText does (flax's resolution: for each dimension, the first rule for its logical name whose mesh
axes are not yet used by the tensor applies; mesh axes of size 1 are ignored). The pass writes the result into the
IR: a `dsv3.mesh` declaration, a `sharding` property on each `dsv3.param`, and `dsv3.shard` constraints on the key
activations (the hidden state entering and leaving each layer, attention heads, logits). Changing parallelism is
changing the mesh or the rules, never the model.

Options: `mesh` (`"data=2,fsdp=4"`), `mode` (`auto`: constraints, XLA propagates the rest; `explicit`: JAX's
explicit-axis sharding, every constraint a `reshard`), `rules` (`"embed=fsdp+expert,mlp=tensor"`, tried before the
defaults).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, TensorType
from xdsl.ir import Block, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter
from xdsl.utils.exceptions import PassFailedException

from ..dialects import dsv3
from ..dialects.attributes import ShardingAttr
from ..dialects.sharding import BATCH_AXES, MESH_AXES, MeshOp, ShardOp

Rule = tuple[str, tuple[str, ...]]

DEFAULT_RULES: tuple[Rule, ...] = (
    ("layers", ()),
    ("vocab", ("tensor", "tensor_transpose")),
    ("embed", ("fsdp", "fsdp_transpose", "tensor_transpose", "expert")),
    ("embed", ("fsdp", "fsdp_transpose", "expert")),
    ("embed", ("fsdp", "expert")),
    ("embed", ("fsdp",)),
    ("mlp", ("fsdp_transpose", "tensor")),
    ("mlp", ("tensor",)),
    ("q_lora", ("fsdp", "fsdp_transpose", "tensor_transpose", "expert")),
    ("q_lora", ("fsdp", "expert")),
    ("q_lora", ("fsdp",)),
    ("kv_lora", ("fsdp", "fsdp_transpose", "tensor_transpose", "expert")),
    ("kv_lora", ("fsdp", "expert")),
    ("kv_lora", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("heads", ("tensor",)),
    ("exp", ("expert",)),
    ("activation_batch", ("data", "fsdp", "fsdp_transpose", "expert")),
    ("activation_heads", ("tensor",)),
    ("activation_embed", ("tensor_transpose",)),
    ("activation_vocab", ("tensor",)),
)
"""Logical axis -> mesh axes, tried in order (after any user rules). Non-expert weights are sharded over `expert`
too (as extra FSDP), so expert parallelism does not replicate attention."""


class ShardingError(PassFailedException):
    """A mesh that cannot place a tensor. `param` and `logical` let the driver point at the source."""

    def __init__(self, message: str, op: Operation | None = None, logical: str | None = None):
        super().__init__(message)
        self.op = op
        self.logical = logical


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4} in the canonical axis order; unknown axes are errors."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        if name not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis '{name}' (known: {', '.join(MESH_AXES)})")
        if not size.isdigit() or int(size) < 1:
            raise ShardingError(f"mesh axis '{name}' needs a positive size, got '{size}'")
        sizes[name] = int(size)
    return {axis: sizes[axis] for axis in MESH_AXES if axis in sizes}


def parse_rules(text: str) -> tuple[Rule, ...]:
    """`"embed=fsdp+expert,mlp=tensor"` -> (("embed", ("fsdp", "expert")), ("mlp", ("tensor",)))."""
    rules = []
    known = {name for name, _ in DEFAULT_RULES}
    for item in filter(None, (part.strip() for part in text.split(","))):
        logical, _, axes = item.partition("=")
        if logical not in known:
            raise ShardingError(f"rule for unknown logical axis '{logical}' (known: {', '.join(sorted(known))})")
        names = tuple(a for a in axes.split("+") if a)
        unknown = [a for a in names if a not in MESH_AXES]
        if unknown:
            raise ShardingError(f"rule '{item}' names unknown mesh axes {unknown}")
        rules.append((logical, names))
    return tuple(rules)


def resolve(
    logical_axes: Sequence[str], shape: Sequence[int], mesh: dict[str, int], rules: Sequence[Rule]
) -> tuple[tuple[str, ...], ...]:
    """The mesh axes of each dimension. Raises ShardingError (with the logical name) when the first applicable rule
    does not divide the dimension."""
    used: set[str] = set()
    result = []
    for logical, size in zip(logical_axes, shape, strict=True):
        chosen: tuple[str, ...] = ()
        for name, axes in rules:
            if name != logical:
                continue
            live = tuple(a for a in axes if mesh.get(a, 1) > 1)
            if any(a in used for a in live):
                continue
            split = math.prod(mesh[a] for a in live)
            if size >= 0 and size % split:
                raise ShardingError(
                    f"mesh axes {'x'.join(f'{a}={mesh[a]}' for a in live)} ({split} ways) do not divide "
                    f"'{logical}' of size {size}",
                    logical=logical,
                )
            chosen = live
            break
        used.update(chosen)
        result.append(chosen)
    return tuple(result)


@dataclass(frozen=True)
class ShardPass(ModulePass):
    name = "dsv3-shard"

    mesh: str = ""
    mode: str = "auto"
    rules: str = ""

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.mode not in ("auto", "explicit"):
            raise ShardingError(f"mode must be auto or explicit, got '{self.mode}'")
        mesh = parse_mesh(self.mesh)
        rules = parse_rules(self.rules) + DEFAULT_RULES
        _remove_previous_sharding(op)
        Rewriter.insert_op(
            MeshOp(mesh, self.mode),
            InsertPoint.at_start(op.body.block),
        )
        for param in dsv3.walk_params(op):
            try:
                dims = resolve(param.axis_names, dsv3.shape_of(param.result), mesh, rules)
            except ShardingError as err:
                raise ShardingError(f"parameter '{param.pname}': {err}", param, err.logical) from None
            param.properties["sharding"] = ShardingAttr.from_axes(dims)
        _constrain_activations(op, mesh, rules)
        if self.mode == "explicit":
            _gather_weights_where_used(op)


def _remove_previous_sharding(module: ModuleOp) -> None:
    """Re-sharding an already sharded module replaces its decisions instead of stacking a second set."""
    for op in list(module.walk()):
        if isinstance(op, MeshOp):
            Rewriter.erase_op(op)
        elif isinstance(op, ShardOp):
            op.result.replace_all_uses_with(op.x)
            Rewriter.erase_op(op)
        elif isinstance(op, dsv3.ParamOp) and "sharding" in op.properties:
            del op.properties["sharding"]


def _activation_layout(value: SSAValue) -> tuple[str, ...] | None:
    """Logical axes of the activations worth constraining: hidden states [batch, seq, embed], attention heads
    [batch, seq, heads, dim], logits [batch, seq, vocab]."""
    shape = dsv3.shape_of(value)
    owner = value.owner
    if isinstance(owner, dsv3.SplitHeadsOp):
        return ("activation_batch", "", "activation_heads", "")
    if isinstance(owner, dsv3.MatmulOp) and isinstance(owner.w.owner, dsv3.ParamOp | dsv3.TransposeOp):
        if len(shape) == 3 and _is_vocab_projection(owner):
            return ("activation_batch", "", "activation_vocab")
    if len(shape) == 3 and isinstance(owner, dsv3.EmbedOp | dsv3.LayerStackOp):
        return ("activation_batch", "", "activation_embed")
    return None


def _is_vocab_projection(op: dsv3.MatmulOp) -> bool:
    w = op.w.owner
    if isinstance(w, dsv3.TransposeOp):
        return True
    return isinstance(w, dsv3.ParamOp) and w.axis_names[-1] == "vocab"


def _constrain(value: SSAValue, layout: tuple[str, ...], mesh: dict[str, int], rules: Sequence[Rule]) -> None:
    try:
        dims = resolve(layout, static_shape(value), mesh, rules)
    except ShardingError as err:
        owner = value.owner if isinstance(value.owner, Operation) else None
        raise ShardingError(f"{describe(value)}: {err}", owner, err.logical) from None
    if any(dims):
        _insert_shard(value, dims)


def describe(value: SSAValue) -> str:
    """An activation in a message: its SSA name, else the op that computes it."""
    if value.name_hint:
        return f"activation '{value.name_hint}'"
    return f"the activation of {value.owner.name}" if isinstance(value.owner, Operation) else "a layer's input"


def static_shape(value: SSAValue) -> list[int]:
    """A value's shape with its dynamic (batch, sequence) dimensions as -1, which `resolve` does not check: the
    batch is checked against the mesh where it is fed."""
    return [-1 if d == dsv3.DYN else d for d in dsv3.shape_of(value)]


def _insert_shard(value: SSAValue, dims: Sequence[Sequence[str]]) -> None:
    """Routes every use of `value` through a new `dsv3.shard` stating `dims`."""
    uses = list(value.uses)
    shard = ShardOp(value, ShardingAttr.from_axes(dims))
    shard.result.name_hint = value.name_hint
    if isinstance(value.owner, Block):
        Rewriter.insert_op(shard, InsertPoint.at_start(value.owner))
    else:
        Rewriter.insert_op(shard, InsertPoint.after(value.owner))
    for use in uses:
        use.operation.operands[use.index] = shard.result


def activation_constraints(module: ModuleOp) -> list[tuple[SSAValue, tuple[str, ...]]]:
    """The activations the pass constrains, with their logical layouts: each layer's input, and what
    `_activation_layout` picks."""
    targets: list[tuple[SSAValue, tuple[str, ...]]] = []
    for op in module.walk():
        if isinstance(op, dsv3.LayerStackOp):
            targets.append((op.body.block.args[0], ("activation_batch", "", "activation_embed")))
        for result in op.results:
            layout = _activation_layout(result) if isinstance(result.type, TensorType) else None
            if layout is not None:
                targets.append((result, layout))
    return targets


def _constrain_activations(module: ModuleOp, mesh: dict[str, int], rules: Sequence[Rule]) -> None:
    for value, layout in activation_constraints(module):
        _constrain(value, layout, mesh, rules)


def _compute_layout(stored: Sequence[Sequence[str]], uses: Sequence[Operation]) -> tuple[tuple[str, ...], ...]:
    """Where a weight is used, its FSDP-style axes are gathered (ZeRO-3); tensor-parallel axes stay split. The
    `expert` axis stays on the expert dimension of weights only the routed experts read (expert parallelism)."""
    experts_only = all(isinstance(use, dsv3.ExpertsOp) for use in uses)
    return tuple(
        tuple(a for a in axes if a not in BATCH_AXES or (experts_only and a == "expert" and i == 0))
        for i, axes in enumerate(stored)
    )


def _gather_weights_where_used(module: ModuleOp) -> None:
    """Explicit mode states every layout change: each layer's slice of a stacked weight (a layer-region argument)
    and each unstacked weight is resharded to its compute layout where it is used."""
    for stack in [op for op in module.walk() if isinstance(op, dsv3.LayerStackOp)]:
        # reversed: each new shard goes to the block's start, so the region reads in argument order
        for operand, arg in reversed(list(zip(stack.operands[1:], stack.body.block.args[1:], strict=True))):
            param = operand.owner
            if isinstance(param, dsv3.ParamOp) and param.sharding is not None:
                stored = param.sharding.axes[1:]  # one layer: without the leading `layers` axis
                layout = _compute_layout(stored, [use.operation for use in arg.uses])
                if layout != stored:
                    _insert_shard(arg, layout)
    for param in dsv3.walk_params(module):
        users = [use.operation for use in param.result.uses if not isinstance(use.operation, dsv3.LayerStackOp)]
        if param.sharding is None or not users:
            continue
        layout = _compute_layout(param.sharding.axes, users)
        if layout != param.sharding.axes:
            _insert_shard(param.result, layout)
