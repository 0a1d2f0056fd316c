"""An analytic estimate of a training step's memory and time per device, from the IR's shapes and a layout alone.

`dsv3c plan` weighs hundreds of layouts and can compile only a handful (minutes each): this is what it prunes and
ranks them by. Nothing is traced or compiled; a layout costs microseconds.

Memory, bytes per device, is what must be live when the layers' backward pass starts:
- the state: each parameter, its AdamW moments (first in the optimizer's `moments` dtype, second in the parameter's)
  and its gradient (the compute dtype for a GEMM weight under `grads compute`, else the parameter's), each divided
  by the ways `dsv3-shard`'s rules split it on the mesh;
- the activations the layout's recompute policy saves for the backward pass (`dsv3-remat`'s tags, read off the IR
  after running the pass), every layer's input, one layer's weights gathered for its GEMMs, one MoE layer's
  routed-expert rows (`_dispatch`), and the f32 logits when the head loss is not fused (where they outgrow the
  gradients: the logits are gone before the layers' gradients exist).
It leaves out what XLA adds around them (each op's own temporaries, the backward pass's copies, fusion buffers), so
it is below what XLA reports: on deepseek3-test / tpu-v5p-8 (fsdp=4, full recompute) it gives 52 GiB where XLA needs
60. Above a chip's HBM, the layout cannot fit.

With a `pipe` axis (the `dsv3-pipeline` pass the target adds for it: DualPipeV, 2 x ranks micro-batches), a device
holds its rank's rows of each layer stack (the widest rank's, as the stage layout pads them) and all of the
embedding, head and MTP (replicated over `pipe`), an f32 gradient accumulator for what it holds plus one chunk's
weight gradients, and the saved activations of the micro-batches its tick tables keep in flight, each a micro-batch
of one chunk's layers (`Stages`).

Time, seconds per step, is the compile report's roofline (`dsv3c/report.py`) with collective bytes estimated instead
of read off the compiled program: FSDP-style weight gathers (forward and again in backward) and gradient
reduce-scatters per parameter, gradient all-reduces over `data`, two activation all-reduces per layer and pass over
`tensor` and `tensor_transpose`, and each MoE layer's all-to-all dispatch and combine over `expert`; a pipelined
step's compute takes 1 / (1 - bubble fraction) as long, and its activations and gradients cross `pipe` every tick.
It only ranks layouts for compiling; the table's figures are the compiler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdsl.dialects.builtin import ModuleOp, TensorType
from xdsl.ir import SSAValue

from .dialects import dsv3
from .dialects.remat import CheckpointOp, RematAction
from .dialects.sharding import BATCH_AXES
from .passes.overlap import OverlapPass
from .passes.pipeline import PipelinePass
from .passes.remat import POLICIES, RematPass, value_names
from .passes.shard import DEFAULT_RULES, ShardingError, activation_constraints, describe, resolve, static_shape
from .pipeline import run_pipeline
from .runtime.pipeline_ticks import build_tables
from .runtime.stages import PIPE_AXIS, stage_layout
from .targets import Chip


@dataclass(frozen=True)
class Param:
    """What the estimate needs of one `dsv3.param`."""

    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_gemm_weight(self) -> bool:
        """A matrix (norm scales and biases are vectors once the `layers` axis is set aside)."""
        return len([a for a in self.axes if a != "layers"]) >= 2


@dataclass(frozen=True)
class Activation:
    """A value kept for the backward pass, `count` times (once per layer of its stack). -1 in `shape` is the batch
    (the first) or the sequence (the second); `split` is the dimension a `tensor` axis splits (heads, vocab), if
    any."""

    count: int
    shape: tuple[int, ...]
    itemsize: int
    split: int | None


@dataclass(frozen=True)
class Model:
    """The facts of a module the estimate reads, gathered once per plan."""

    params: tuple[Param, ...]
    constrained: tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]  # `dsv3-shard`'s, described, in order
    stacked: dict[str, tuple[int, int]]  # per parameter of a layer stack: the stack's index and layer count
    saved: dict[str, tuple[Activation, ...]]  # per recompute policy
    logits: tuple[Activation, ...]  # the f32 logits each loss reads (absent when the head loss is fused)
    compute_itemsize: int
    moments_itemsize: int
    grads_in_compute: bool
    dim: int
    layers: int
    moe_layers: int
    top_k: int
    expert_hidden: int  # the routed experts' width


@dataclass(frozen=True)
class Stages:
    """What the pipeline of `ranks` stages the target compiles for a `pipe` axis holds on each rank, from the
    `dsv3-pipeline` pass's cut and the schedule's tick tables (`stage_facts`)."""

    ranks: int
    microbatches: int
    chunks: int
    rows: dict[str, int]  # per stacked parameter: the rows of it each rank holds
    band: dict[str, int]  # per stacked parameter: the most rows one chunk runs (one chunk's weight gradients)
    held: int  # chunk residual sets (one micro-batch of one chunk each) a rank keeps at once
    payload_slots: int  # hidden states a rank keeps for sending and receiving (activations and gradients)
    ticks: int
    bubble_fraction: float


def stage_facts(module: ModuleOp, ranks: int) -> Stages:
    """Cuts a clone of `module` as `dsv3c compile` does for `pipe=ranks` (the pass the target adds, with its
    defaults), or raises the `UserError` the pass gives."""
    clone = module.clone()
    run_pipeline(clone, [PipelinePass(ranks=ranks, schedule="dualpipev")])
    layout = stage_layout(clone)
    assert layout is not None
    tables = build_tables(layout.schedule)
    return Stages(
        ranks=ranks,
        microbatches=layout.schedule.microbatches,
        chunks=layout.schedule.num_chunks,
        rows={n: s.rows for s in layout.stacks for n in s.params},
        band={n: max(s.width) for s in layout.stacks for n in s.params},
        held=sum(tables.res_slots),
        payload_slots=tables.act_slots + tables.grad_slots,
        ticks=tables.ticks,
        bubble_fraction=float(tables.bubble_fraction),
    )


@dataclass(frozen=True)
class Estimate:
    """Bytes per device by kind, and the step-time figure layouts are ranked by."""

    params: int
    optimizer: int
    gradients: int
    activations: int
    step_time_s: float

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def to_json(self) -> dict[str, float]:
        return {"params": self.params, "optimizer": self.optimizer, "gradients": self.gradients,
                "activations": self.activations, "total": self.total, "step_time_s": self.step_time_s}


def model_facts(module: ModuleOp) -> Model:
    """Reads a module (before any pass) once: its parameters, what each recompute policy saves, its logits."""
    params = tuple(
        Param(p.pname, p.axis_names, tuple(dsv3.shape_of(p.result)), _itemsize(p.result.type),
              bool(p.trainable.value.data))
        for p in dsv3.walk_params(module)
    )
    constrained: dict[tuple, str] = {}  # one per layout and shape, the first in program order (the pass's order)
    for value, layout in activation_constraints(module):
        constrained.setdefault((layout, tuple(static_shape(value))), describe(value))
    stacks = [op for op in module.walk() if isinstance(op, dsv3.LayerStackOp)]
    stacked = {
        operand.owner.pname: (index, stack.int_prop("count"))
        for index, stack in enumerate(stacks) for operand in stack.operands[1:]
        if isinstance(operand.owner, dsv3.ParamOp)
    }
    embed = next(op for op in module.walk() if isinstance(op, dsv3.EmbedOp))
    optimizer = dsv3.find_optimizer(module)
    routers = [(s, op) for s in stacks for op in s.body.walk() if isinstance(op, dsv3.RouterOp)]
    logits = tuple(
        _activation(1, op.logits, split=2)
        for op in module.walk() if isinstance(op, dsv3.CrossEntropyOp) and isinstance(op.logits.owner, dsv3.MatmulOp)
    )
    return Model(
        params=params,
        constrained=tuple((what, layout, shape) for (layout, shape), what in constrained.items()),
        stacked=stacked,
        saved={policy: _saved(module, policy) for policy in POLICIES},
        logits=logits,
        compute_itemsize=_itemsize(embed.result.type),
        moments_itemsize=2 if optimizer is not None and optimizer.moments.data == "bf16" else 4,
        grads_in_compute=optimizer is None or optimizer.grads.data == "compute",
        dim=dsv3.shape_of(embed.result)[-1],
        layers=sum(s.int_prop("count") for s in stacks),
        moe_layers=sum(s.int_prop("count") for s, _ in routers),
        top_k=routers[0][1].int_prop("top_k") if routers else 0,
        expert_hidden=next((p.shape[-1] for p in params if p.name.endswith("experts_gate")), 0),
    )


def refusal(model: Model, mesh: dict[str, int], batch: int, stages: Stages | None = None) -> str | None:
    """Why `dsv3-shard`, the batch or the pipeline's micro-batches refuse a mesh (the messages they give), or None."""
    ways = math.prod(mesh.get(a, 1) for a in BATCH_AXES)
    if batch % ways:
        axes = "x".join(a for a in BATCH_AXES if mesh.get(a, 1) > 1)
        return f"batch {batch} does not divide over the batch mesh axes {axes} = {ways} devices"
    if stages is not None:
        if batch % stages.microbatches:
            return f"batch {batch} does not divide into the pipeline's {stages.microbatches} micro-batches"
        if (batch // stages.microbatches) % ways:
            return (f"a micro-batch of {batch // stages.microbatches} sequences does not divide over the {ways} "
                    "devices of the batch mesh axes")
    for p in model.params:
        try:
            resolve(p.axes, p.shape, mesh, DEFAULT_RULES)
        except ShardingError as err:
            return f"dsv3-shard: parameter '{p.name}': {err}"
    for what, layout, shape in model.constrained:
        try:
            resolve(layout, shape, mesh, DEFAULT_RULES)
        except ShardingError as err:
            return f"dsv3-shard: {what}: {err}"
    return None


def estimate(
    model: Model, mesh: dict[str, int], remat: str, fused_head: bool, batch: int, seq: int, flops: float,
    chip: Chip, stages: Stages | None = None,
) -> Estimate:
    """Memory and step time per device of a layout `refusal` accepts; `flops` is the step's model FLOPs. A mesh
    with a `pipe` axis needs its `stages` (`stage_facts`)."""
    ways = {a: mesh.get(a, 1) for a in ("data", "tensor", "tensor_transpose", "expert")}
    microbatches = stages.microbatches if stages is not None else 1
    local_batch = batch // microbatches // math.prod(mesh.get(a, 1) for a in BATCH_AXES)
    params = optimizer = gradients = 0
    gathered: dict[int, float] = {}  # per layer stack: one layer's weights as its GEMMs read them
    collective = 0.0
    for p in model.params:
        dims = resolve(p.axes, p.shape, mesh, DEFAULT_RULES)
        split = math.prod(mesh[a] for d in dims for a in d)
        local = p.size / split
        grad_itemsize = model.compute_itemsize if model.grads_in_compute and p.is_gemm_weight else p.itemsize
        grad = local * grad_itemsize
        if stages is not None:
            # a rank's rows of a stacked parameter; the gradient is an accumulator over micro-batches in the
            # parameter's dtype beside the weight gradients of the widest chunk's band
            if p.name in stages.rows:
                per_row = local / model.stacked[p.name][1]
                grad = per_row * (stages.rows[p.name] * p.itemsize + stages.band[p.name] * grad_itemsize)
                local = per_row * stages.rows[p.name]
            else:
                grad = local * p.itemsize
        params += round(local * p.itemsize)
        if p.trainable:
            optimizer += round(local * (model.moments_itemsize + p.itemsize))
            gradients += round(grad)
        # Where a weight is used its batch-like axes are gathered, except `expert` on an expert dimension.
        gather = math.prod(
            mesh[a] for axis, d in zip(p.axes, dims, strict=True) for a in d if a in BATCH_AXES
            and not (a == "expert" and axis == "exp")
        )
        if p.name in model.stacked:
            stack, count = model.stacked[p.name]
            one_layer = p.size / split / count
            gathered[stack] = gathered.get(stack, 0.0) + one_layer * gather * model.compute_itemsize
        # a pipelined rank gathers its layers' weights (and reduces their gradients) for every micro-batch
        rounds = microbatches if stages is not None and p.name in stages.rows else 1
        if gather > 1 and p.trainable:
            collective += rounds * (2 * local * gather * model.compute_itemsize + grad)
        if ways["data"] > 1 and p.trainable:
            collective += grad
    saved = sum(_bytes(a, local_batch, seq, ways["tensor"]) for a in model.saved[remat])
    if stages is not None:
        # each held residual set is one micro-batch of one chunk (a chunk's share of the layers), beside the hidden
        # states in the tables' send and receive slots
        payload = local_batch * seq * model.dim * model.compute_itemsize
        saved = saved * stages.held / stages.chunks + payload * stages.payload_slots
        collective += 2 * stages.ticks * payload  # an activation and a gradient over `pipe` per tick
    logits = 0.0 if fused_head else sum(_bytes(a, local_batch, seq, ways["tensor"]) for a in model.logits)
    # The logits are gone before the layers' gradients exist: they count where they outgrow the gradients.
    activations = saved + max(gathered.values(), default=0.0) + _dispatch(model, mesh, local_batch * seq)
    activations += max(logits - gradients, 0.0)
    # the layers' activations a device exchanges, over all micro-batches of its rank's share of the layers
    hidden = local_batch * seq * model.dim * model.compute_itemsize * microbatches / mesh.get(PIPE_AXIS, 1)
    for axis in ("tensor", "tensor_transpose"):
        if ways[axis] > 1:
            collective += 4 * model.layers * hidden  # attention and FFN outputs, forward and backward
    if ways["expert"] > 1:
        share = (ways["expert"] - 1) / ways["expert"]
        collective += 4 * model.moe_layers * model.top_k * hidden * share  # dispatch and combine, both passes
    devices = math.prod(mesh.values())
    bubble = stages.bubble_fraction if stages is not None else 0.0
    seconds = max(
        flops / (devices * chip.peak_bf16_flops) / (1 - bubble),
        3 * (params + optimizer) / chip.hbm_bandwidth,
        collective / chip.interconnect_bandwidth,
    )
    return Estimate(params, optimizer, gradients, round(activations), seconds)


def _dispatch(model: Model, mesh: dict[str, int], tokens: int) -> float:
    """One MoE layer's routed-expert rows on a device (`runtime/lower/experts.py`): with `ep` expert-parallel devices
    and no capacity limit, each device receives a buffer of every local token from each of the `ep` devices, and
    runs its experts over `top_k` (row, choice) pairs of each: the rows gathered in expert order, their gate and up
    projections and the experts' output. The overlap pass splits the tokens into `OverlapPass.chunks` chunks."""
    if not model.moe_layers:
        return 0.0
    ep = mesh.get("expert", 1)
    chunk = tokens / (OverlapPass.chunks if math.prod(mesh.values()) > 1 else 1)
    pairs = ep * chunk * model.top_k
    hidden = model.expert_hidden / mesh.get("tensor", 1)
    return model.compute_itemsize * (ep * chunk * model.dim + pairs * (2 * model.dim + 2 * hidden))


def _saved(module: ModuleOp, policy: str) -> tuple[Activation, ...]:
    """What `policy` keeps per layer for the backward pass: each layer's input, and the values its tags save (every
    activation under `none`, which tags nothing)."""
    clone = module.clone()
    run_pipeline(clone, [RematPass(policy=policy)])
    kept: list[Activation] = []
    for stack in [op for op in clone.walk() if isinstance(op, dsv3.LayerStackOp)]:
        count, block = stack.int_prop("count"), stack.body.block
        kept.append(_activation(count, block.args[0], split=None))
        if policy == "none":
            kept += [_activation(count, v, _heads(v)) for v in value_names(block)]
        else:
            kept += [_activation(count, t.x, _heads(t.x)) for t in block.ops
                     if isinstance(t, CheckpointOp) and t.action.data == RematAction.SAVE]
    return tuple(kept)


def _activation(count: int, value: SSAValue, split: int | None) -> Activation:
    shape = tuple(-1 if d == dsv3.DYN else d for d in dsv3.shape_of(value))
    return Activation(count, shape, _itemsize(value.type), split)


def _heads(value: SSAValue) -> int | None:
    """[batch, seq, heads, head dim], what `split_heads` makes, is split over `tensor` on its heads."""
    return 2 if len(dsv3.shape_of(value)) == 4 else None


def _bytes(a: Activation, local_batch: int, seq: int, tensor: int) -> float:
    dims = list(a.shape)
    dynamic = [i for i, d in enumerate(dims) if d == -1]
    for i, size in zip(dynamic, (local_batch, seq), strict=False):
        dims[i] = size
    elements = math.prod(max(d, 1) for d in dims)
    if a.split is not None and dims[a.split] % tensor == 0:
        elements //= tensor
    return a.count * elements * a.itemsize


def _itemsize(kind: TensorType) -> int:
    return max(kind.element_type.bitwidth // 8, 1)
