"""The dsv3 dialect: a DeepSeek-V3-family model as ops on typed tensors.

The IR has three kinds of op:
- declarations: `dsv3.param` (a named parameter with shape, dtype, logical axes and init), `dsv3.optimizer`;
- tensor ops: projections are plain `dsv3.matmul`s on named parameters, so passes can re-associate them
  (MLA absorption) or quantise them (FP8); attention, routing and experts are ops of their own because their
  lowering is a unit (softmax in FP32, group-limited top-k, dropless grouped GEMMs);
- structure and effects: `dsv3.layer_stack` holds one layer in a region and a count (it lowers to `lax.scan`, so
  compile time does not grow with depth), `dsv3.output` names what the program returns and its role (which values
  are weighted loss terms, which are the logits), `dsv3.bias_update` states the auxiliary-loss-free router-bias
  rule applied outside the gradient.

Activations are `tensor<?x?x...>`: batch and sequence are chosen when compiling, every other dimension is static so
that verifiers can check shapes when the IR is built, parsed or edited by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import auto
from typing import Any, ClassVar

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    ArrayAttr,
    BoolAttr,
    Float32Type,
    FloatAttr,
    IntegerAttr,
    IntegerType,
    ModuleOp,
    StringAttr,
    TensorType,
)
from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import Attribute, Operation, Region, SpacedOpaqueSyntaxAttribute, SSAValue
from xdsl.irdl import (
    IRDLOperation,
    ParsePropInAttrDict,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    region_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.traits import IsTerminator, Pure, RecursiveMemoryEffect
from xdsl.utils.exceptions import VerifyException
from xdsl.utils.str_enum import StrEnum

from ..frontend.limits import MAX_MTP_DEPTH
from .attributes import ShardingAttr
from .kernels import ATTENTION_KERNELS, EXPERT_KERNELS, MATMUL_KERNELS, Kernel, KernelAttr
from .quant_attr import QuantAttr, check_tiling

DYN = DYNAMIC_INDEX

_FORMAT = "operands attr-dict `:` functional-type(operands, results)"


def shape_of(value: SSAValue | Attribute) -> tuple[int, ...]:
    """Static shape of a tensor value or type (-1 for a dynamic dimension)."""
    ty = value.type if isinstance(value, SSAValue) else value
    assert isinstance(ty, TensorType)
    return tuple(ty.get_shape())


def _dims_match(a: int, b: int) -> bool:
    return a == DYN or b == DYN or a == b


def _same_shape(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(_dims_match(x, y) for x, y in zip(a, b, strict=True))


def _fmt(shape: Sequence[int]) -> str:
    return "x".join("?" if d == DYN else str(d) for d in shape) or "scalar"


def _element_type(value: SSAValue) -> Attribute:
    assert isinstance(value.type, TensorType)
    return value.type.element_type


def _int(value: int) -> IntegerAttr:
    return IntegerAttr(value, 64)


def _float(value: float) -> FloatAttr:
    return FloatAttr(float(value), 64)


# ---------------------------------------------------------------------------------------------------------------
# Choices: a closed set of words each, so a misspelt one is refused when the IR is parsed, not inside the lowering
# ---------------------------------------------------------------------------------------------------------------


class RouterScore(StrEnum):
    """How `dsv3.router` turns gate logits into expert scores."""

    SIGMOID = auto()
    """Independent sigmoid scores (DeepSeek-V3); a group's score is the sum of its top-2 biased scores."""
    SOFTMAX = auto()
    """A softmax over the experts (DeepSeek-V2); a group's score is its best one."""


@irdl_attr_definition
class RouterScoreAttr(EnumAttribute[RouterScore], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<score sigmoid>`."""

    name = "dsv3.score"


class RopeLayout(StrEnum):
    """Which features of a head `dsv3.rope` rotates together, as the checkpoint stores them."""

    INTERLEAVED = auto()
    """Pairs (2i, 2i+1), as DeepSeek's own checkpoints."""
    HALF = auto()
    """Pairs (i, i + d/2), as HF transformers' rotate_half."""


@irdl_attr_definition
class RopeLayoutAttr(EnumAttribute[RopeLayout], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<rope_layout half>`."""

    name = "dsv3.rope_layout"


class HeadLossGrads(StrEnum):
    """When `dsv3.head_loss` computes the gradients of its operands."""

    BACKWARD = auto()
    """In the backward pass, from each slice's logits computed again: the forward pass keeps only its operands."""
    FORWARD = auto()
    """In the forward pass, from the logits it has just made (the loss is a scalar, so the backward pass only scales
    them by the loss's cotangent): one head GEMM fewer and no logits or their gradient kept, for the gradients
    themselves (h's shape and the head's) held from forward to backward. `chunks` is then an upper bound: slices
    hold at least 8 MiB of logits each (`runtime/lower/losses.py`)."""


@irdl_attr_definition
class HeadLossGradsAttr(EnumAttribute[HeadLossGrads], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<head_loss_grads forward>`."""

    name = "dsv3.head_loss_grads"


class OutputRole(StrEnum):
    """What a `dsv3.output` is for. Passes and the runtime find outputs by role, so renaming one changes only how
    reports call it."""

    LOSS = auto()
    """The language-model loss, a weighted scalar term of the training loss; one per function."""
    MTP_LOSS = auto()
    """A multi-token-prediction module's loss, a weighted scalar term; one per MTP depth. What only these need is
    the MTP part of a function (`dialects/mtp.py`)."""
    AUX_LOSS = auto()
    """An auxiliary weighted scalar term, such as the sequence-wise balance loss."""
    METRIC = auto()
    """Reported only, never part of the loss (the expert load)."""
    LOGITS = auto()
    """The next-token logits of the function's model: what inference returns; one per function."""
    HIDDEN = auto()
    """The final hidden state, which the MTP draft model reads; one per function."""


LOSS_ROLES = (OutputRole.LOSS, OutputRole.MTP_LOSS, OutputRole.AUX_LOSS)
"""Roles whose outputs are weighted terms of the training loss."""
UNIQUE_ROLES = (OutputRole.LOSS, OutputRole.LOGITS, OutputRole.HIDDEN)
"""Roles a function has at most one output of, so that a consumer can ask for "the" logits."""


@irdl_attr_definition
class OutputRoleAttr(EnumAttribute[OutputRole], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<role logits>`."""

    name = "dsv3.role"


class _Op(IRDLOperation):
    """Base of dsv3 ops: properties print in the attribute dictionary, types as a functional type."""

    irdl_options = (ParsePropInAttrDict(),)
    assembly_format = _FORMAT

    def __init__(self, *, properties: Mapping[str, Attribute | None] | None = None, **fields: Any):
        """For the ops' own constructors: properties go in the order the op declares them, so that a built op
        prints exactly as the same op parsed from text (the attribute dictionary keeps insertion order)."""
        order = list(self.get_irdl_definition().properties)
        given = dict(properties or {})
        super().__init__(properties={k: given[k] for k in sorted(given, key=order.index)}, **fields)

    def fail(self, message: str) -> None:
        raise VerifyException(f"'{self.name}' op {message}")

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def int_prop(self, name: str) -> int:
        attr = self.properties[name]
        assert isinstance(attr, IntegerAttr)
        return attr.value.data

    def float_prop(self, name: str) -> float:
        attr = self.properties[name]
        assert isinstance(attr, FloatAttr | IntegerAttr)
        return float(attr.value.data)

    def str_prop(self, name: str) -> str:
        attr = self.properties[name]
        assert isinstance(attr, StringAttr)
        return attr.data

    def bool_prop(self, name: str) -> bool:
        attr = self.properties[name]
        assert isinstance(attr, IntegerAttr)
        return bool(attr.value.data)

    def opt_float_prop(self, name: str) -> float | None:
        return self.float_prop(name) if name in self.properties else None

    KERNELS: ClassVar[tuple[Kernel, ...]] = ()
    """The kernels this op may be lowered to (`kernel` attribute); empty for ops without a choice."""

    def kernel_choice(self) -> Kernel | None:
        """The kernel the IR asks for, None for the op's plain lowering."""
        attr = self.properties.get("kernel")
        return attr.data if isinstance(attr, KernelAttr) else None

    def verify_kernel(self) -> None:
        kernel = self.kernel_choice()
        if kernel is not None:
            allowed = ", ".join(k.value for k in self.KERNELS)
            self.expect(kernel in self.KERNELS, f"kernel '{kernel.value}' is not one of this op's ({allowed})")

    def expect_range(self, name: str, low: float, high: float = math.inf, low_open: bool = False,
                     high_open: bool = True) -> None:
        """A numeric property must be finite and in the given interval; IR text can say `inf`, `nan` or anything."""
        value = self.float_prop(name)
        ok = math.isfinite(value) and (low < value if low_open else low <= value)
        ok = ok and (value < high if high_open else value <= high)
        if high == math.inf:
            what = "positive" if low == 0 and low_open else "non-negative" if low == 0 else f"at least {low:g}"
        else:
            what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        self.expect(ok, f"{name} must be finite and {what}, got {value:g}")


# ---------------------------------------------------------------------------------------------------------------
# Declarations and structure
# ---------------------------------------------------------------------------------------------------------------


@irdl_op_definition
class ParamOp(_Op):
    """A model parameter. `axes` names each dimension logically (sharding rules map names to mesh axes);
    `init` is `normal` (with `std`), `zeros` or `ones`; `trainable = false` marks state updated outside the gradient
    (the router correction bias)."""

    name = "dsv3.param"
    param_name = prop_def(StringAttr, prop_name="name")
    axes = prop_def(ArrayAttr[StringAttr])
    init = prop_def(StringAttr)
    std = opt_prop_def(FloatAttr)
    trainable = prop_def(BoolAttr)
    sharding = opt_prop_def(ShardingAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())
    assembly_format = "attr-dict `:` type($result)"

    def __init__(
        self, name: str, result_type: TensorType, axes: Sequence[str], init: str, std: float | None = None,
        trainable: bool = True,
    ):
        properties: dict[str, Attribute] = {
            "name": StringAttr(name), "axes": ArrayAttr([StringAttr(a) for a in axes]), "init": StringAttr(init),
            "trainable": BoolAttr.from_bool(trainable),
        }
        if std is not None:
            properties["std"] = _float(std)
        super().__init__(result_types=[result_type], properties=properties)

    INITS: ClassVar[tuple[str, ...]] = ("normal", "zeros", "ones")

    @property
    def pname(self) -> str:
        return self.param_name.data

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.data for a in self.axes.data)

    def verify_(self) -> None:
        shape = shape_of(self.result)
        self.expect(DYN not in shape, f"'{self.pname}': a parameter needs a static shape, got {_fmt(shape)}")
        self.expect(
            len(self.axis_names) == len(shape),
            f"'{self.pname}': {len(self.axis_names)} axis names for a rank-{len(shape)} tensor",
        )
        self.expect(self.init.data in self.INITS, f"'{self.pname}': init must be one of {', '.join(self.INITS)}")
        if self.sharding is not None:
            dims = len(self.sharding.axes)
            self.expect(dims == len(shape), f"'{self.pname}': sharding has {dims} dimensions for rank {len(shape)}")
        if self.init.data == "normal":
            std = None if self.std is None else self.std.value.data
            self.expect(std is not None and 0 < std < math.inf, f"'{self.pname}': normal init needs a finite std > 0")

GRAD_DTYPES = ("compute", "f32")
"""What `dsv3.optimizer`'s `grads` may say."""


@irdl_op_definition
class OptimizerOp(_Op):
    """AdamW hyper-parameters and learning-rate schedule; `decay_steps = 0` decays over the run's step count.
    `grads` is the dtype weight gradients are held in between the backward pass and the update: `compute` keeps the
    dtype their GEMM produced them in (half the memory of f32 under bf16 compute, the same values: the GEMM already
    rounded them), `f32` widens each layer's gradient as the backward pass produces it.
    `ema_decay`, when present, asks the runtime to keep an exponential moving average of the trainable parameters
    (`ema = decay * ema + (1 - decay) * params` after every applied step) in host memory."""

    name = "dsv3.optimizer"
    kind = prop_def(StringAttr)
    lr = prop_def(FloatAttr)
    b1 = prop_def(FloatAttr)
    b2 = prop_def(FloatAttr)
    eps = prop_def(FloatAttr)
    weight_decay = prop_def(FloatAttr)
    clip = prop_def(FloatAttr)
    moments = prop_def(StringAttr)
    grads = prop_def(StringAttr)
    schedule = prop_def(StringAttr)
    warmup = prop_def(IntegerAttr)
    decay_steps = prop_def(IntegerAttr)
    min_lr_ratio = prop_def(FloatAttr)
    ema_decay = opt_prop_def(FloatAttr)
    assembly_format = "attr-dict"

    def __init__(
        self, *, kind: str, lr: float, b1: float, b2: float, eps: float, weight_decay: float, clip: float,
        moments: str, grads: str, schedule: str, warmup: int, decay_steps: int, min_lr_ratio: float,
        ema_decay: float | None = None,
    ):
        floats = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": weight_decay, "clip": clip,
                  "min_lr_ratio": min_lr_ratio}
        if ema_decay is not None:
            floats["ema_decay"] = ema_decay
        super().__init__(properties={
            "kind": StringAttr(kind), "moments": StringAttr(moments), "grads": StringAttr(grads),
            "schedule": StringAttr(schedule),
            "warmup": _int(warmup), "decay_steps": _int(decay_steps), **{k: _float(v) for k, v in floats.items()},
        })

    def verify_(self) -> None:
        self.expect(self.kind.data == "adamw", f"unknown optimizer '{self.kind.data}' (only adamw)")
        self.expect(self.schedule.data in ("cosine", "linear", "constant"), f"unknown schedule '{self.schedule.data}'")
        self.expect(self.moments.data in ("f32", "bf16"), "moments must be f32 or bf16")
        self.expect(self.grads.data in GRAD_DTYPES, f"grads must be one of {', '.join(GRAD_DTYPES)}")
        self.expect_range("lr", 0, low_open=True)
        self.expect_range("b1", 0, 1)
        self.expect_range("b2", 0, 1)
        self.expect_range("eps", 0, low_open=True)
        self.expect_range("weight_decay", 0)
        self.expect_range("clip", 0)
        self.expect_range("warmup", 0)
        self.expect_range("decay_steps", 0)
        self.expect_range("min_lr_ratio", 0, 1, high_open=False)
        if "ema_decay" in self.properties:
            self.expect_range("ema_decay", 0, 1)


@irdl_op_definition
class YieldOp(_Op):
    """Terminates a layer region: the first value is the carried hidden state, the rest are per-layer outputs that
    the stack returns stacked along a leading `layers` axis."""

    name = "dsv3.yield"
    values = var_operand_def()
    traits = traits_def(IsTerminator(), Pure())
    assembly_format = "operands attr-dict `:` type(operands)"

    def __init__(self, values: Sequence[SSAValue]):
        super().__init__(operands=[list(values)])


KERNEL_FAMILIES = ("attention", "experts")
"""Kernels whose forward residuals a layer stack can keep for backward (`kernel_residuals`,
`dsv3-remat{kernels=...}`)."""


@irdl_op_definition
class LayerStackOp(_Op):
    """`count` identical layers applied in sequence. Operand 0 is the incoming hidden state; the other operands are
    parameters stacked along a leading axis of size `count`; the region's block takes the hidden state and one layer's
    slice of each parameter. Results: the final hidden state, then each per-layer output stacked. With `remat` (the
    recompute policy `dsv3-remat` applied) other than `none`, the backward pass keeps only what the layer's
    `dsv3.checkpoint` tags say (`dialects/remat.py`); otherwise, everything."""

    name = "dsv3.layer_stack"
    operands_ = var_operand_def()
    outputs = var_result_def()
    body = region_def("single_block")
    count = prop_def(IntegerAttr)
    layer_kind = prop_def(StringAttr, prop_name="kind")
    remat = opt_prop_def(StringAttr)
    kernel_residuals = opt_prop_def(ArrayAttr[StringAttr])
    """The kernels (`attention`, `experts`; `dsv3-remat{kernels=...}`) whose backward reads what their forward kept
    (blockwise attention's output and log-sum-exp, the routed experts' sorted rows and hidden activations) instead of
    running the forward again; absent: they are recomputed with everything else the tags do not save."""
    chunks = opt_prop_def(ArrayAttr[IntegerAttr])
    """Layers per pipeline chunk, in order (`dsv3-pipeline`, `dialects/pipeline.py`); absent when not pipelined."""
    traits = traits_def(RecursiveMemoryEffect())
    assembly_format = "operands attr-dict `:` functional-type(operands, results) $body"

    def __init__(
        self, hidden: SSAValue, params: Sequence[SSAValue], body: Region, count: int, kind: str,
        result_types: Sequence[Attribute],
    ):
        super().__init__(
            operands=[[hidden, *params]],
            result_types=[list(result_types)],
            regions=[body],
            properties={"count": IntegerAttr(count, 64), "kind": StringAttr(kind)},
        )

    @property
    def chunk_layers(self) -> list[int] | None:
        """Layers per pipeline chunk, or None when the stack is not pipelined."""
        return None if self.chunks is None else [n.value.data for n in self.chunks.data]

    def verify_(self) -> None:
        count = self.int_prop("count")
        self.expect(count >= 1, "count must be at least 1")
        if self.kernel_residuals is not None:
            kernels = [k.data for k in self.kernel_residuals.data]
            self.expect(set(kernels) <= set(KERNEL_FAMILIES), f"kernel_residuals {kernels} must name kernels of "
                        f"{list(KERNEL_FAMILIES)}")
            self.expect(self.remat is not None and self.remat.data not in ("none", "full"),
                        "kernel_residuals needs a recompute policy that keeps some values (not none or full)")
        chunks = self.chunk_layers
        if chunks is not None:
            self.expect(all(n >= 0 for n in chunks) and sum(chunks) == count,
                        f"chunks {chunks} must be layer counts that add up to count = {count}")
        block = self.body.block
        args, operands = block.args, self.operands
        self.expect(len(args) == len(operands), f"region takes {len(args)} values but the stack has {len(operands)}")
        self.expect(args[0].type == operands[0].type, "the region's hidden-state argument must match operand 0")
        for i, (arg, operand) in enumerate(zip(args[1:], operands[1:], strict=True), start=1):
            stacked = shape_of(operand)
            self.expect(
                len(stacked) >= 1 and stacked[0] == count,
                f"operand {i} ({_fmt(stacked)}) must be stacked along a leading axis of size count = {count}",
            )
            self.expect(
                shape_of(arg) == stacked[1:],
                f"region argument {i} has shape {_fmt(shape_of(arg))}, expected one layer of {_fmt(stacked)}",
            )
        terminator = block.last_op
        self.expect(isinstance(terminator, YieldOp), "region must end with dsv3.yield")
        assert terminator is not None
        yielded = list(terminator.operands)
        self.expect(len(yielded) == len(self.results), f"yields {len(yielded)} values for {len(self.results)} results")
        self.expect(yielded[0].type == self.results[0].type, "the yielded hidden state must match result 0")
        for i, (value, result) in enumerate(zip(yielded[1:], self.results[1:], strict=True), start=1):
            self.expect(
                shape_of(result) == (count, *shape_of(value)),
                f"result {i} must stack the yielded {_fmt(shape_of(value))} to {count}x{_fmt(shape_of(value))}",
            )


@irdl_op_definition
class OutputOp(_Op):
    """Names a program output and says what it is for (`role`): passes and the runtime select outputs by role, the
    name is what reports call it. Loss roles carry a `weight`: the training loss is the sum of weight * value over
    them; the metric of a name is the mean of its outputs."""

    name = "dsv3.output"
    value = operand_def(TensorType)
    output_name = prop_def(StringAttr, prop_name="name")
    role = prop_def(OutputRoleAttr)
    weight = opt_prop_def(FloatAttr)
    assembly_format = "operands attr-dict `:` type(operands)"

    def __init__(self, value: SSAValue, name: str, role: OutputRole, weight: float | None = None):
        properties: dict[str, Attribute] = {"name": StringAttr(name), "role": OutputRoleAttr(role)}
        if weight is not None:
            properties["weight"] = FloatAttr(weight, 64)
        super().__init__(operands=[value], properties=properties)

    @property
    def output_role(self) -> OutputRole:
        return self.role.data

    def verify_(self) -> None:
        name, role = self.output_name.data, self.output_role
        if role in LOSS_ROLES:
            self.expect(self.weight is not None, f"'{name}': a {role} output is a loss term and needs a weight")
            self.expect(shape_of(self.value) == (), f"loss term '{name}' must be a scalar")
            self.expect_range("weight", 0)
        else:
            self.expect(self.weight is None, f"'{name}': only loss roles take a weight, not {role}")


@irdl_op_definition
class BiasUpdateOp(_Op):
    """Auxiliary-loss-free balancing: after each step, `b += rate * sign(mean(load) - load)` per layer, for the
    non-trainable parameter `param` of shape [layers, experts] and the stacked expert load of the same shape."""

    name = "dsv3.bias_update"
    load = operand_def(TensorType)
    param = prop_def(StringAttr)
    rate = prop_def(FloatAttr)
    assembly_format = "operands attr-dict `:` type(operands)"

    def __init__(self, load: SSAValue, param: str, rate: float):
        super().__init__(operands=[load], properties={"param": StringAttr(param), "rate": _float(rate)})

    def verify_(self) -> None:
        self.expect_range("rate", 0)


# ---------------------------------------------------------------------------------------------------------------
# Tensor ops
# ---------------------------------------------------------------------------------------------------------------


@irdl_op_definition
class TokenWindowOp(_Op):
    """From a token batch [B, T], the window [B, T-1] starting at `offset`, with a float mask that is 0 where the
    window runs past the end (multi-token prediction targets) or across a document boundary. Packed batches mark
    the first token of each document in-band, as -(id + 1): the ids are the decoded ones, and a position whose
    target lies in a later document than itself (a document starts in (i, i + offset]) is masked out of the loss."""

    name = "dsv3.token_window"
    tokens = operand_def(TensorType)
    offset = prop_def(IntegerAttr)
    ids = result_def(TensorType)
    mask = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, tokens: SSAValue, offset: int):
        mask = TensorType(Float32Type(), [DYN, DYN])
        super().__init__(operands=[tokens], result_types=[tokens.type, mask], properties={"offset": _int(offset)})

    def verify_(self) -> None:
        # 0 is the inputs, 1 the labels, k + 1 the targets of MTP module k; beyond, the window would mask everything.
        offset = self.int_prop("offset")
        last = MAX_MTP_DEPTH + 1
        self.expect(0 <= offset <= last, f"offset must be in [0, {last}] (inputs, labels, MTP targets), got {offset}")


@irdl_op_definition
class PositionsOp(_Op):
    """Absolute positions [B, S] of a token window, for RoPE."""

    name = "dsv3.positions"
    ids = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, ids: SSAValue):
        super().__init__(operands=[ids], result_types=[ids.type])


@irdl_op_definition
class EmbedOp(_Op):
    """Row lookup of `ids` in the table [vocab, dim], cast to the result's (compute) dtype."""

    name = "dsv3.embed"
    table = operand_def(TensorType)
    ids = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, table: SSAValue, ids: SSAValue, dtype: Attribute):
        """`dtype` is the compute dtype the rows are cast to."""
        shape = [*shape_of(ids), shape_of(table)[-1]]
        super().__init__(operands=[table, ids], result_types=[TensorType(dtype, shape)])

    def verify_(self) -> None:
        self.expect(shape_of(self.result)[-1] == shape_of(self.table)[-1], "result width must equal the table's dim")


@irdl_op_definition
class RMSNormOp(_Op):
    """x / sqrt(mean(x^2) + eps) * w over the last axis, computed in float32."""

    name = "dsv3.rms_norm"
    x = operand_def(TensorType)
    weight = operand_def(TensorType)
    eps = prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, weight: SSAValue, eps: float):
        super().__init__(operands=[x, weight], result_types=[x.type], properties={"eps": _float(eps)})

    def verify_(self) -> None:
        width = shape_of(self.x)[-1]
        got = _fmt(shape_of(self.weight))
        self.expect(shape_of(self.weight) == (width,), f"weight must have shape {width}, got {got}")
        self.expect_range("eps", 0, low_open=True)


@irdl_op_definition
class MatmulOp(_Op):
    """x[..., k] @ w[k, n]: a Linear layer. The weight is cast to x's dtype; accumulation and the result use the
    result type's dtype (float32 for the output head). `kernel` (`dsv3-kernels{matmul=...}`) says how its weight
    gradient is computed."""

    name = "dsv3.matmul"
    x = operand_def(TensorType)
    w = operand_def(TensorType)
    kernel = opt_prop_def(KernelAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    KERNELS: ClassVar[tuple[Kernel, ...]] = MATMUL_KERNELS

    def __init__(self, x: SSAValue, w: SSAValue, dtype: Attribute | None = None):
        """The result has x's dtype unless `dtype` says otherwise (float32 logits)."""
        shape = [*shape_of(x)[:-1], shape_of(w)[-1]]
        super().__init__(operands=[x, w], result_types=[TensorType(dtype or _element_type(x), shape)])

    def verify_(self) -> None:
        xs, ws, rs = shape_of(self.x), shape_of(self.w), shape_of(self.result)
        self.expect(len(ws) == 2, f"weight must be 2-D, got {_fmt(ws)}")
        self.expect(_dims_match(xs[-1], ws[0]), f"contracts {_fmt(xs)} with {_fmt(ws)}: {xs[-1]} != {ws[0]}")
        self.expect(_same_shape(rs, (*xs[:-1], ws[1])), f"result {_fmt(rs)} should be {_fmt((*xs[:-1], ws[1]))}")
        self.verify_kernel()


@irdl_op_definition
class TransposeOp(_Op):
    """Swaps the two axes of a 2-D parameter (the tied output head reads the embedding table transposed)."""

    name = "dsv3.transpose"
    x = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue):
        result = TensorType(_element_type(x), list(reversed(shape_of(x))))
        super().__init__(operands=[x], result_types=[result])

    def verify_(self) -> None:
        self.expect(shape_of(self.result) == tuple(reversed(shape_of(self.x))), "result must be the transposed shape")


@irdl_op_definition
class SplitHeadsOp(_Op):
    """[..., heads*d] -> [..., heads, d]."""

    name = "dsv3.split_heads"
    x = operand_def(TensorType)
    heads = prop_def(IntegerAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, heads: int):
        *rest, width = shape_of(x)
        result = TensorType(_element_type(x), [*rest, heads, width // heads])
        super().__init__(operands=[x], result_types=[result], properties={"heads": _int(heads)})

    def verify_(self) -> None:
        xs, rs, h = shape_of(self.x), shape_of(self.result), self.int_prop("heads")
        self.expect(xs[-1] % h == 0, f"width {xs[-1]} does not split into {h} heads")
        self.expect(_same_shape(rs, (*xs[:-1], h, xs[-1] // h)), f"result {_fmt(rs)} does not match {h} heads")


@irdl_op_definition
class MergeHeadsOp(_Op):
    """[..., heads, d] -> [..., heads*d]."""

    name = "dsv3.merge_heads"
    x = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue):
        *rest, heads, width = shape_of(x)
        super().__init__(operands=[x], result_types=[TensorType(_element_type(x), [*rest, heads * width])])

    def verify_(self) -> None:
        xs, rs = shape_of(self.x), shape_of(self.result)
        self.expect(_same_shape(rs, (*xs[:-2], xs[-2] * xs[-1])), f"result {_fmt(rs)} should be the merged heads")


@irdl_op_definition
class SliceOp(_Op):
    """x[..., start:start+size] on the last axis (splits q into nope/rope parts, kv into latent/rope key)."""

    name = "dsv3.slice"
    x = operand_def(TensorType)
    start = prop_def(IntegerAttr)
    size = prop_def(IntegerAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, start: int, size: int):
        result = TensorType(_element_type(x), [*shape_of(x)[:-1], size])
        super().__init__(operands=[x], result_types=[result], properties={"start": _int(start), "size": _int(size)})

    def verify_(self) -> None:
        xs, start, size = shape_of(self.x), self.int_prop("start"), self.int_prop("size")
        self.expect(start >= 0 and size > 0 and start + size <= xs[-1], f"[{start}:{start + size}] is outside {xs[-1]}")
        self.expect(_same_shape(shape_of(self.result), (*xs[:-1], size)), "result width must equal size")


@irdl_op_definition
class ConcatOp(_Op):
    """Concatenation on the last axis."""

    name = "dsv3.concat"
    a = operand_def(TensorType)
    b = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, a: SSAValue, b: SSAValue):
        result = TensorType(_element_type(a), [*shape_of(a)[:-1], shape_of(a)[-1] + shape_of(b)[-1]])
        super().__init__(operands=[a, b], result_types=[result])

    def verify_(self) -> None:
        self.expect(shape_of(self.result)[-1] == shape_of(self.a)[-1] + shape_of(self.b)[-1], "widths must add up")


@irdl_op_definition
class RopeOp(_Op):
    """Rotary embedding of the last axis of x [B, S, ..., d] at `positions` [B, S]. `layout` is `interleaved`
    (pairs 2i, 2i+1) or `half` (pairs i, i+d/2). With `yarn_factor`, frequencies are YaRN-interpolated and cos/sin
    scaled by mscale(factor, mscale)/mscale(factor, mscale_all_dim), as HF transformers does."""

    name = "dsv3.rope"
    x = operand_def(TensorType)
    positions = operand_def(TensorType)
    theta = prop_def(FloatAttr)
    layout = prop_def(RopeLayoutAttr)
    yarn_factor = opt_prop_def(FloatAttr)
    yarn_original_len = opt_prop_def(IntegerAttr)
    yarn_beta_fast = opt_prop_def(FloatAttr)
    yarn_beta_slow = opt_prop_def(FloatAttr)
    yarn_mscale = opt_prop_def(FloatAttr)
    yarn_mscale_all_dim = opt_prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, x: SSAValue, positions: SSAValue, theta: float, layout: RopeLayout, *, yarn_factor: float | None = None,
        yarn_original_len: int | None = None, yarn_beta_fast: float | None = None,
        yarn_beta_slow: float | None = None, yarn_mscale: float | None = None,
        yarn_mscale_all_dim: float | None = None,
    ):
        """The `yarn_*` arguments are given together, for a YaRN-extended context, or not at all."""
        properties: dict[str, Attribute] = {"theta": _float(theta), "layout": RopeLayoutAttr(layout)}
        if yarn_original_len is not None:
            properties["yarn_original_len"] = _int(yarn_original_len)
        yarn = {"yarn_factor": yarn_factor, "yarn_beta_fast": yarn_beta_fast, "yarn_beta_slow": yarn_beta_slow,
                "yarn_mscale": yarn_mscale, "yarn_mscale_all_dim": yarn_mscale_all_dim}
        properties.update({k: _float(v) for k, v in yarn.items() if v is not None})
        super().__init__(operands=[x, positions], result_types=[x.type], properties=properties)

    def verify_(self) -> None:
        self.expect(shape_of(self.x)[-1] % 2 == 0, "the rotated width must be even")
        self.expect_range("theta", 0, low_open=True)
        if self.yarn_factor is not None:
            self.expect(self.yarn_original_len is not None, "yarn_factor needs yarn_original_len")
            self.expect_range("yarn_factor", 1)
            self.expect_range("yarn_original_len", 1)
            for name in ("yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim"):
                if name in self.properties:
                    self.expect_range(name, 0)


@irdl_op_definition
class AttentionOp(_Op):
    """Causal MLA attention core: scores = (q_nope . k_nope + q_pe . k_pe) * scale, softmax in float32, weighted sum
    of v. q_nope [B,S,H,n], q_pe [B,S,H,r], k_nope [B,S,H,n], k_pe [B,S,r] (one rope key shared by all heads),
    v [B,S,H,dv] -> [B,S,H,dv]."""

    name = "dsv3.attention"
    q_nope = operand_def(TensorType)
    q_pe = operand_def(TensorType)
    k_nope = operand_def(TensorType)
    k_pe = operand_def(TensorType)
    v = operand_def(TensorType)
    scale = prop_def(FloatAttr)
    kernel = opt_prop_def(KernelAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, q_nope: SSAValue, q_pe: SSAValue, k_nope: SSAValue, k_pe: SSAValue, v: SSAValue, scale: float,
    ):
        super().__init__(
            operands=[q_nope, q_pe, k_nope, k_pe, v], result_types=[v.type], properties={"scale": _float(scale)}
        )

    KERNELS: ClassVar[tuple[Kernel, ...]] = ATTENTION_KERNELS

    def verify_(self) -> None:
        self.verify_kernel()
        qn, qp, kn, kp, v = (shape_of(x) for x in (self.q_nope, self.q_pe, self.k_nope, self.k_pe, self.v))
        self.expect(len(qn) == 4 and len(kp) == 3, "q/k/v must be [B,S,H,d] and k_pe [B,S,r]")
        self.expect_range("scale", 0, low_open=True)
        self.expect(qn[2] == kn[2] == v[2] == qp[2], "q, k and v must have the same number of heads")
        self.expect(qn[3] == kn[3], f"q_nope width {qn[3]} != k_nope width {kn[3]}")
        self.expect(qp[3] == kp[2], f"q_pe width {qp[3]} != k_pe width {kp[2]}")
        self.expect(_same_shape(shape_of(self.result), v), "result must have v's shape")


@irdl_op_definition
class SwiGLUOp(_Op):
    """silu(gate) * up."""

    name = "dsv3.swiglu"
    gate = operand_def(TensorType)
    up = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, gate: SSAValue, up: SSAValue):
        super().__init__(operands=[gate, up], result_types=[gate.type])

    def verify_(self) -> None:
        self.expect(_same_shape(shape_of(self.gate), shape_of(self.up)), "gate and up must have the same shape")


@irdl_op_definition
class AddOp(_Op):
    """Elementwise sum (residual connections)."""

    name = "dsv3.add"
    a = operand_def(TensorType)
    b = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, a: SSAValue, b: SSAValue):
        super().__init__(operands=[a, b], result_types=[a.type])

    def verify_(self) -> None:
        self.expect(_same_shape(shape_of(self.a), shape_of(self.b)), "operands must have the same shape")


@irdl_op_definition
class SumOp(_Op):
    """Sum of all elements, as a float32 scalar."""

    name = "dsv3.sum"
    x = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue):
        super().__init__(operands=[x], result_types=[TensorType(Float32Type(), [])])


@irdl_op_definition
class RouterOp(_Op):
    """DeepSeekMoE gate. scores = score_fn(x @ w) [B,S,E]; experts are chosen on scores + bias, first keeping the
    `keep_groups` best of `groups` expert groups (a group's score is the sum of its top-2 biased scores with sigmoid
    scores, as in V3, or its best score with softmax scores, as in V2); gate weights
    are the unbiased scores of the chosen experts, normalised to sum 1 when `normalize`, times `scale`.
    Results: weights [B,S,k] f32, indices [B,S,k] i32, scores [B,S,E] f32."""

    name = "dsv3.router"
    x = operand_def(TensorType)
    w = operand_def(TensorType)
    bias = operand_def(TensorType)
    score = prop_def(RouterScoreAttr)
    top_k = prop_def(IntegerAttr)
    groups = prop_def(IntegerAttr)
    keep_groups = prop_def(IntegerAttr)
    scale = prop_def(FloatAttr)
    normalize = prop_def(BoolAttr)
    weights = result_def(TensorType)
    indices = result_def(TensorType)
    scores = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, x: SSAValue, w: SSAValue, bias: SSAValue, *, score: RouterScore, top_k: int, groups: int,
        keep_groups: int, scale: float, normalize: bool,
    ):
        rows, experts = shape_of(x)[:-1], shape_of(w)[-1]
        f32, i32 = Float32Type(), IntegerType(32)
        super().__init__(
            operands=[x, w, bias],
            result_types=[
                TensorType(f32, [*rows, top_k]), TensorType(i32, [*rows, top_k]), TensorType(f32, [*rows, experts])
            ],
            properties={
                "score": RouterScoreAttr(score), "top_k": _int(top_k), "groups": _int(groups),
                "keep_groups": _int(keep_groups), "scale": _float(scale), "normalize": BoolAttr.from_bool(normalize),
            },
        )

    def verify_(self) -> None:
        ws = shape_of(self.w)
        self.expect(len(ws) == 2 and _dims_match(ws[0], shape_of(self.x)[-1]), "gate weight must be [dim, experts]")
        experts, k = ws[1], self.int_prop("top_k")
        groups, keep = self.int_prop("groups"), self.int_prop("keep_groups")
        self.expect(shape_of(self.bias) == (experts,), f"bias must have shape {experts}")
        self.expect_range("scale", 0, low_open=True)
        self.expect(0 < k <= experts, f"top_k = {k} must be in [1, {experts}]")
        self.expect(groups >= 1 and experts % groups == 0, f"groups = {groups} must divide {experts} experts")
        self.expect(1 <= keep <= groups, f"keep_groups = {keep} must be in [1, groups = {groups}]")
        self.expect(k <= keep * experts // groups, f"top_k = {k} exceeds the {keep * experts // groups} kept experts")
        for result, width in ((self.weights, k), (self.indices, k), (self.scores, experts)):
            self.expect(shape_of(result)[-1] == width, f"result {_fmt(shape_of(result))} must end in {width} (top_k)")


@irdl_op_definition
class ExpertsOp(_Op):
    """Routed SwiGLU experts: out[t] = sum_j weights[t,j] * expert_{indices[t,j]}(x[t]); w_gate, w_up
    [E, dim, hidden]; w_down [E, hidden, dim]. Dropless unless `capacity_factor` bounds the rows each device sends
    to each other device under expert parallelism; `chunks` splits the tokens into independent dispatch/compute/combine
    pipelines that the scheduler can overlap (the overlap pass sets it); `kernel` picks the grouped GEMM.

    With `x_quant`, `w_quant` and `grad_quant` (set by `dsv3-fp8-quant`) the three grouped GEMMs run in FP8 as
    `dsv3.fp8_matmul` does: each routed row quantised per `x_quant` tile, each expert's weights per `w_quant` block,
    the backward GEMMs too; for the weight gradient each expert's rows are padded to whole row tiles so that no scale
    is shared between two experts. Gate weights and the final combination stay in FP32."""

    name = "dsv3.experts"
    x = operand_def(TensorType)
    weights = operand_def(TensorType)
    indices = operand_def(TensorType)
    w_gate = operand_def(TensorType)
    w_up = operand_def(TensorType)
    w_down = operand_def(TensorType)
    capacity_factor = opt_prop_def(FloatAttr)
    chunks = opt_prop_def(IntegerAttr)
    kernel = opt_prop_def(KernelAttr)
    x_quant = opt_prop_def(QuantAttr)
    w_quant = opt_prop_def(QuantAttr)
    grad_quant = opt_prop_def(QuantAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, x: SSAValue, weights: SSAValue, indices: SSAValue, w_gate: SSAValue, w_up: SSAValue, w_down: SSAValue,
    ):
        """Plain dropless experts; passes set capacity, chunks, kernel and quantisation on the op afterwards."""
        super().__init__(operands=[x, weights, indices, w_gate, w_up, w_down], result_types=[x.type])

    KERNELS: ClassVar[tuple[Kernel, ...]] = EXPERT_KERNELS

    @property
    def quantized(self) -> bool:
        return self.x_quant is not None

    def verify_(self) -> None:
        self.verify_kernel()
        quants = (self.x_quant, self.w_quant, self.grad_quant)
        self.expect(all(q is None for q in quants) or None not in quants, "x_quant, w_quant and grad_quant go together")
        if self.x_quant is not None and self.w_quant is not None and self.grad_quant is not None:
            check_tiling(self, self.x_quant, self.w_quant, self.grad_quant)
        if self.capacity_factor is not None:
            self.expect(self.capacity_factor.value.data > 0, "capacity_factor must be positive")
        if self.chunks is not None:
            self.expect(self.chunks.value.data >= 1, "chunks must be at least 1")
        dim = shape_of(self.x)[-1]
        g, u, d = shape_of(self.w_gate), shape_of(self.w_up), shape_of(self.w_down)
        self.expect(len(g) == 3 and g == u, "w_gate and w_up must both be [experts, dim, hidden]")
        self.expect(g[1] == dim, f"expert input width {g[1]} != {dim}")
        self.expect(d == (g[0], g[2], dim), f"w_down must be [{g[0]}, {g[2]}, {dim}], got {_fmt(d)}")
        self.expect(shape_of(self.weights)[-1] == shape_of(self.indices)[-1], "weights and indices disagree on top_k")


@irdl_op_definition
class BalanceLossOp(_Op):
    """Sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences (REFERENCE.md section 3);
    scores [B,S,E], indices [B,S,k] -> scalar."""

    name = "dsv3.balance_loss"
    scores = operand_def(TensorType)
    indices = operand_def(TensorType)
    alpha = prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, scores: SSAValue, indices: SSAValue, alpha: float):
        super().__init__(
            operands=[scores, indices], result_types=[TensorType(Float32Type(), [])],
            properties={"alpha": _float(alpha)},
        )

    def verify_(self) -> None:
        self.expect_range("alpha", 0)


@irdl_op_definition
class ExpertLoadOp(_Op):
    """Tokens routed to each expert, [E] float32 (feeds the bias update and the load report)."""

    name = "dsv3.expert_load"
    indices = operand_def(TensorType)
    experts = prop_def(IntegerAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, indices: SSAValue, experts: int):
        super().__init__(
            operands=[indices], result_types=[TensorType(Float32Type(), [experts])],
            properties={"experts": _int(experts)},
        )

    def verify_(self) -> None:
        self.expect(shape_of(self.result) == (self.int_prop("experts"),), "result must have one entry per expert")


@irdl_op_definition
class GradMaskOp(_Op):
    """Identity forward; in backward, zeroes the gradient of every token whose feature-axis RMS exceeds
    `threshold` (MaxText's per-token gradient mask)."""

    name = "dsv3.grad_mask"
    x = operand_def(TensorType)
    threshold = prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, threshold: float):
        super().__init__(operands=[x], result_types=[x.type], properties={"threshold": _float(threshold)})

    def verify_(self) -> None:
        self.expect_range("threshold", 0, low_open=True)


@irdl_op_definition
class CrossEntropyOp(_Op):
    """Mean token cross-entropy of float32 logits [B,S,V] against labels [B,S], over tokens where mask is 1."""

    name = "dsv3.cross_entropy"
    logits = operand_def(TensorType)
    labels = operand_def(TensorType)
    mask = operand_def(TensorType)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, logits: SSAValue, labels: SSAValue, mask: SSAValue):
        super().__init__(operands=[logits, labels, mask], result_types=[TensorType(Float32Type(), [])])


@irdl_op_definition
class HeadLossOp(_Op):
    """The output head and its cross-entropy in one: mean over tokens where mask is 1 of the cross-entropy of the
    float32 logits h @ head against labels, computed `chunks` slices of the sequence at a time so that the full
    [B, S, V] logits never exist. h [B,S,D], head [D,V], labels and mask [B,S]. `grads` says when the gradients of h
    and head are computed (`backward`, the default: the backward pass recomputes each slice's logits; `forward`:
    alongside the loss). `dsv3-fuse-head-loss` makes it from a `dsv3.matmul` feeding a `dsv3.cross_entropy`; `kernel`
    is the head GEMM's, as that matmul's."""

    name = "dsv3.head_loss"
    h = operand_def(TensorType)
    head = operand_def(TensorType)
    labels = operand_def(TensorType)
    mask = operand_def(TensorType)
    chunks = prop_def(IntegerAttr)
    grads = opt_prop_def(HeadLossGradsAttr)
    kernel = opt_prop_def(KernelAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    KERNELS: ClassVar[tuple[Kernel, ...]] = MATMUL_KERNELS

    def __init__(self, h: SSAValue, head: SSAValue, labels: SSAValue, mask: SSAValue, chunks: int,
                 grads: HeadLossGrads = HeadLossGrads.BACKWARD):
        properties: dict[str, Attribute] = {"chunks": _int(chunks)}
        if grads != HeadLossGrads.BACKWARD:  # the default prints nothing, so IR written before it reads the same
            properties["grads"] = HeadLossGradsAttr(grads)
        super().__init__(
            operands=[h, head, labels, mask], result_types=[TensorType(Float32Type(), [])], properties=properties,
        )

    @property
    def grads_when(self) -> HeadLossGrads:
        return self.grads.data if self.grads is not None else HeadLossGrads.BACKWARD

    def verify_(self) -> None:
        h, w = shape_of(self.h), shape_of(self.head)
        self.expect(len(h) == 3 and len(w) == 2, f"h must be [B,S,D] and head [D,V], got {_fmt(h)} and {_fmt(w)}")
        self.expect(_dims_match(h[-1], w[0]), f"h width {h[-1]} != head input width {w[0]}")
        self.expect(len(shape_of(self.labels)) == 2 and len(shape_of(self.mask)) == 2, "labels and mask are [B,S]")
        self.expect(self.int_prop("chunks") >= 1, "chunks must be at least 1")
        self.verify_kernel()


CORE_OPS: list[type[IRDLOperation]] = [
        ParamOp, OptimizerOp, YieldOp, LayerStackOp, OutputOp, BiasUpdateOp, TokenWindowOp, PositionsOp, EmbedOp,
        RMSNormOp, MatmulOp, TransposeOp, SplitHeadsOp, MergeHeadsOp, SliceOp, ConcatOp, RopeOp, AttentionOp,
        SwiGLUOp, AddOp, SumOp, RouterOp, ExpertsOp, BalanceLossOp, ExpertLoadOp, GradMaskOp, CrossEntropyOp,
        HeadLossOp,
]
"""The model-level ops; `dialects/dialect.py` assembles them with the ops of the other dialect modules."""

CORE_ATTRS: list[type[Attribute]] = [RouterScoreAttr, RopeLayoutAttr, OutputRoleAttr, HeadLossGradsAttr]
"""The choice attributes of the model-level ops."""


def walk_params(root: Operation) -> list[ParamOp]:
    """Every parameter declared under `root`, in program order."""
    return [op for op in root.walk() if isinstance(op, ParamOp)]


def find_optimizer(module: ModuleOp) -> OptimizerOp | None:
    """The module's `dsv3.optimizer` (at most one: `dialects/checks.py`), or None for an inference program."""
    return next((op for op in module.ops if isinstance(op, OptimizerOp)), None)
