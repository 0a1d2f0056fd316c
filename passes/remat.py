"""`dsv3-remat`: the recompute policy of every layer stack, written into the IR.

Training keeps, for the backward pass, every activation each layer produced; recomputing some of them in backward
trades FLOPs for memory. The pass names each activation of a layer with a `dsv3.checkpoint` tag whose `action` says
what backward does with it (`save` on the device, `offload` to host memory, `recompute`) and marks the
`dsv3.layer_stack` with the policy (`remat = "deepseek"`); the lowering turns the tags into a `jax.checkpoint`
policy. Inside an op nothing is kept under any policy but `none`: the attention probabilities and the experts'
hidden activations are recomputed from the op's inputs, as fused kernels (FlashAttention) do.

Policies (`-p 'dsv3-remat{policy=deepseek}'`):
- `none`: no checkpointing, backward keeps everything (as without the pass, but stated: `remat = "none"`);
- `outputs`: keep every op's outputs, recompute only what is inside ops (the baseline the other policies trim);
- `deepseek` (default): DeepSeek-V3's choice (REFERENCE.md section 7): recompute the outputs of every RMSNorm and
  of the MLA up-projections, the matmuls whose weight maps a latent (`q_lora`, `kv_lora` input axis: `wq_b`,
  `wkv_b`), with what only they feed (the per-head queries, keys and values up to the attention core); keep the
  rest;
- `full`: keep nothing but each layer's input, recompute the whole layer.

`kernels=attention,experts` keeps, in addition, what those kernels computed for their own backward (blockwise
attention's output and log-sum-exp, as FlashAttention keeps them; the routed experts' sort, sorted rows, hidden
activations and unsorted outputs) instead of running the kernels' forward again in backward
(`kernel_residuals = ["attention", "experts"]` on the stack). It pays where recomputing costs more than storing.
`kernels=auto` decides per stack from its shapes, by the rule measured on the CPU (the CPU's default): attention's
residuals always (its output and one float per head and token, against the whole attention forward: a train step
2-3% faster on `tiny` and on a 256-wide model), the experts' where their forward's FLOPs per byte of residual,
6 D H / (bytes (2 D + 3 H)) for model width D and expert width H, reach `EXPERT_FLOPS_PER_BYTE` (32): the
256-wide model (55) was 5% faster keeping them, the 34M-parameter peer model (110) 7% keeping both kernels', `tiny`
(14) 8% slower (`benchmarks/RESULTS.md`). Not with `none` (which keeps everything) or `full` (which keeps only each
layer's input).

`save`, `offload` and `recompute` (comma-separated value names, as the tags print them: `attn,h,c_kv`) override the
policy for those values: `dsv3-remat{policy=full save=c_kv,k_pe}` keeps only the latents,
`dsv3-remat{policy=deepseek offload=attn,h}` keeps the attention output and the residual stream in pinned host
memory (on TPU and GPU; XLA:CPU has one memory, where offloading is a no-op). `keep=true` leaves stacks that already
have a policy (an IR file with hand-edited tags) as they are: the default train pipeline runs the pass so.

Names: a value's SSA name (`%c_kv` -> `c_kv`, without the printer's `_N` suffix), else the parameter it was
computed with (`attn_norm`, `wq_b`: a projection's output is named after its weight), else the op (`slice`),
made unique within a layer by `.2`, `.3`. Only activations (values with a batch or sequence dimension) are tagged,
and not reshapes (`split_heads`, `merge_heads`): everything else is small or free and recomputed. A tag decides
only for values the backward pass reads (a matmul's input, not its output). Run the pass after passes that rewrite a
layer's ops (MLA absorption, FP8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ArrayAttr, ModuleOp, StringAttr, TensorType
from xdsl.ir import Block, BlockArgument, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from ..dialects import dsv3
from ..dialects.remat import POLICIES, CheckpointOp, RematAction
from ..dialects.sharding import ShardOp
from ..frontend.errors import UserError

LATENT_AXES = ("q_lora", "kv_lora")
"""Logical axes of MLA's compressed latents: a projection out of one is an up-projection."""

_PRINTER_SUFFIX = re.compile(r"_\d+$")

AUTO_KERNELS = "auto"
"""`kernels=auto`: the kernels whose residuals to keep are chosen per stack from its shapes (`auto_kernels`)."""

EXPERT_FLOPS_PER_BYTE = 32
"""`kernels=auto` keeps the routed experts' residuals where recomputing their forward costs at least this many FLOPs
per byte it would save (module docstring: measured on the CPU between 14, slower kept, and 55, faster kept)."""

_UNTAGGED = (dsv3.YieldOp, ShardOp, CheckpointOp, dsv3.SplitHeadsOp, dsv3.MergeHeadsOp)
"""Ops whose results are not tagged: terminators, identities, and reshapes, which cost nothing to recompute (a
tag on a reshape would make it, not its input, the residual: `offload=attn` would move nothing)."""


@dataclass(frozen=True)
class RematPass(ModulePass):
    """Tags each layer's activations with what backward does with them (module docstring: policies, options)."""

    name = "dsv3-remat"

    policy: str = "deepseek"
    save: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    recompute: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    keep: bool = False

    def overrides(self) -> dict[str, RematAction]:
        """Value name -> action from the `save`, `offload` and `recompute` options."""
        chosen: dict[str, RematAction] = {}
        options = ((RematAction.SAVE, self.save), (RematAction.OFFLOAD, self.offload),
                   (RematAction.RECOMPUTE, self.recompute))
        for action, names in options:
            for name in names:
                if chosen.get(name, action) != action:
                    raise UserError(f"dsv3-remat: '{name}' is listed under both {chosen[name]} and {action}")
                chosen[name] = action
        return chosen

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.policy not in POLICIES:
            raise UserError(f"dsv3-remat: unknown policy '{self.policy}' (expected one of {', '.join(POLICIES)})")
        overrides = self.overrides()
        if self.policy == "none" and overrides:
            raise UserError("dsv3-remat: policy none keeps everything; give save/offload/recompute another policy")
        auto = self.kernels == (AUTO_KERNELS,)
        unknown_kernels = [] if auto else sorted(set(self.kernels) - set(dsv3.KERNEL_FAMILIES))
        if unknown_kernels:
            raise UserError(f"dsv3-remat: kernels={','.join(unknown_kernels)} (expected "
                            f"{', '.join(dsv3.KERNEL_FAMILIES)}, or {AUTO_KERNELS} alone)")
        if self.kernels and self.policy in ("none", "full"):
            raise UserError(f"dsv3-remat: kernels= needs a policy that keeps values (deepseek or outputs), not "
                            f"{self.policy}")
        known: set[str] = set()
        for stack in [o for o in op.walk() if isinstance(o, dsv3.LayerStackOp)]:
            if self.keep and stack.remat is not None:
                known.update(t.tag for t in stack.body.block.ops if isinstance(t, CheckpointOp))
                continue
            clear_remat(stack)
            stack.properties["remat"] = StringAttr(self.policy)
            kernels = auto_kernels(stack) if auto else self.kernels
            if kernels:
                stack.properties["kernel_residuals"] = ArrayAttr([StringAttr(k) for k in kernels])
            if self.policy == "none":
                continue
            names = value_names(stack.body.block)
            known.update(names.values())
            recomputed = deepseek_recomputed(stack) if self.policy == "deepseek" else set()
            last_tag: dict[Operation, Operation] = {}  # the tags of an op's results follow it in result order
            for value, name in names.items():
                recompute = self.policy == "full" or value in recomputed
                default = RematAction.RECOMPUTE if recompute else RematAction.SAVE
                owner = value.owner
                assert isinstance(owner, Operation)
                last_tag[owner] = _tag(value, name, overrides.get(name, default), last_tag.get(owner, owner))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"dsv3-remat: no layer has a value named {unknown} (names: {', '.join(sorted(known))})")


def auto_kernels(stack: dsv3.LayerStackOp) -> list[str]:
    """The kernels whose residuals `kernels=auto` keeps in this stack (module docstring: the rule)."""
    ops = list(stack.body.walk())
    chosen = ["attention"] if any(isinstance(op, dsv3.AttentionOp) for op in ops) else []
    experts = [op for op in ops if isinstance(op, dsv3.ExpertsOp)]
    if experts and all(expert_flops_per_byte(op) >= EXPERT_FLOPS_PER_BYTE for op in experts):
        chosen.append("experts")
    return chosen


def expert_flops_per_byte(op: dsv3.ExpertsOp) -> float:
    """FLOPs of the experts' forward per byte of what their backward would keep, per routed row: three GEMMs of
    D x H (6 D H) against the sorted row and its unsorted result (2 D) and the gate, up and SwiGLU outputs (3 H)."""
    dim, hidden = dsv3.shape_of(op.w_gate)[-2:]
    element = op.x.type.get_element_type()
    size = getattr(element, "bitwidth", 32) // 8
    return 6 * dim * hidden / (size * (2 * dim + 3 * hidden))


def clear_remat(stack: dsv3.LayerStackOp) -> None:
    """Removes a previous policy, so that running the pass again replaces it instead of stacking tags."""
    for tag in [o for o in stack.body.block.ops if isinstance(o, CheckpointOp)]:
        tag.result.replace_all_uses_with(tag.x)
        Rewriter.erase_op(tag)
    for name in ("remat", "kernel_residuals"):
        if name in stack.properties:
            del stack.properties[name]


def is_activation(value: SSAValue) -> bool:
    """A tensor with a dynamic (batch or sequence) dimension: what grows with the batch and costs memory."""
    return isinstance(value.type, TensorType) and dsv3.DYN in dsv3.shape_of(value)


def value_names(block: Block) -> dict[SSAValue, str]:
    """The tag name of each activation a layer computes, in program order, unique within the layer."""
    names: dict[SSAValue, str] = {}
    used: dict[str, int] = {}
    for op in block.ops:
        if isinstance(op, _UNTAGGED):
            continue
        for value in op.results:
            if not is_activation(value):
                continue
            base = _base_name(value, op)
            used[base] = used.get(base, 0) + 1
            names[value] = base if used[base] == 1 else f"{base}.{used[base]}"
    return names


def _base_name(value: SSAValue, op: Operation) -> str:
    if value.name_hint:
        return _PRINTER_SUFFIX.sub("", value.name_hint)
    params = {id(p): p for p in (source_param(v) for v in op.operands) if p is not None}  # FP8: values and scales
    if len(params) == 1:
        return next(iter(params.values())).pname.rsplit(".", 1)[-1]
    return op.name.removeprefix("dsv3.")


def source_param(value: SSAValue) -> dsv3.ParamOp | None:
    """The parameter a value is computed from alone (through a layer stack's region arguments, transposes,
    quantisation), or None for anything that depends on an activation."""
    if isinstance(value, BlockArgument):
        stack = value.block.parent_op()
        if isinstance(stack, dsv3.LayerStackOp) and value.index > 0:
            return source_param(stack.operands[value.index])
        return None
    owner = value.owner
    if isinstance(owner, dsv3.ParamOp):
        return owner
    if not isinstance(owner, Operation) or not owner.operands:
        return None
    sources = [source_param(v) for v in owner.operands]
    return sources[0] if all(s is not None for s in sources) else None


def is_up_projection(op: Operation) -> bool:
    """A projection (matmul, FP8 matmul) of an activation by a weight whose input axis is an MLA latent."""
    weights = [p for p in (source_param(v) for v in op.operands) if p is not None]
    activations = [v for v in op.operands if source_param(v) is None]
    return bool(activations) and any(len(w.axis_names) == 3 and w.axis_names[1] in LATENT_AXES for w in weights)


def deepseek_recomputed(stack: dsv3.LayerStackOp) -> set[SSAValue]:
    """DeepSeek-V3's recompute set in one layer: RMSNorm outputs, MLA up-projection outputs, and what is computed
    from up-projection outputs alone (besides parameters and the layer's inputs)."""
    block = stack.body.block
    up: set[SSAValue] = set()
    norms: set[SSAValue] = set()
    for op in block.ops:
        if isinstance(op, dsv3.RMSNormOp):
            norms.update(op.results)
        if is_up_projection(op):
            up.update(op.results)
            continue
        inputs = [v for v in op.operands if _defined_in(v, block)]
        if any(v in up for v in inputs) and all(v in up for v in inputs):
            up.update(op.results)
    return norms | up


def _defined_in(value: SSAValue, block: Block) -> bool:
    """Computed by an op of the layer: not a region argument (layer input, parameters), not from outside
    (positions), not a parameter view. Those are inputs of the checkpointed layer, kept anyway."""
    return isinstance(value.owner, Operation) and value.owner.parent_block() is block and source_param(value) is None


def _tag(value: SSAValue, name: str, action: RematAction, after: Operation) -> CheckpointOp:
    """Inserts `dsv3.checkpoint` on `value` after `after` and makes every use of the value read it."""
    uses = list(value.uses)
    tag = CheckpointOp(value, name, action)
    tag.result.name_hint = value.name_hint
    Rewriter.insert_op(tag, InsertPoint.after(after))
    for use in uses:
        use.operation.operands[use.index] = tag.result
    return tag
