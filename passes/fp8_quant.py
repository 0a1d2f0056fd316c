"""`dsv3-fp8-quant`: DeepSeek-V3's fine-grained FP8 recipe, written into the IR.

Each eligible `dsv3.matmul %x, %w` becomes

    %xq, %xs = dsv3.quantize %x {quant = #dsv3.quant<f8E4M3FN, [1, 128], amax>}       (1 x 128 activation tiles)
    %wq, %ws = dsv3.quantize %w {quant = #dsv3.quant<f8E4M3FN, [128, 128], amax>}     (128 x 128 weight blocks)
    %y = dsv3.fp8_matmul %xq, %xs, %wq, %ws {x_quant = ..., w_quant = ..., grad_quant = ...}

and each `dsv3.experts` a `dsv3.fp8_experts`. What stays in high precision is decided from the IR: a matmul whose
weight (followed through layer stacks, transposes and dequantisations to its `dsv3.param`) matches an `exclude`
pattern by name or by logical axis. The default, `vocab`, keeps the output head (and a tied embedding) in BF16/FP32;
the MoE gate (`dsv3.router`), the embedding, norms and the attention core are not matmuls and are never touched.

Options (`-p 'dsv3-fp8-quant{block=32 bwd=e5m2}'`, space-separated):
- `block` (128): the tile: activations and gradients 1 x block, weights block x block; the K-block of every GEMM.
  Dimensions that are not multiples are padded with zeros (tiny models: `block=32` gives them several tiles).
- `fwd` (e4m3), `bwd` (e4m3): the FP8 format of activations and weights, and of gradients (`e5m2` is the common
  alternative for gradients; DeepSeek-V3 uses E4M3 everywhere).
- `pow2_scales` (false): round every scale up to a power of two.
- `per_tensor` (false): one scale per tensor, the common recipe, for comparison.
- `exclude` (vocab): glob patterns over the weight's parameter name and logical axes (`exclude=vocab,"mtp.*"`);
  `none` excludes nothing.
- `experts` (true): quantise the routed experts' grouped GEMMs too.
- `weights_only` (false): inference with FP8 weight storage: each eligible weight parameter becomes FP8 with a
  `<name>.scale` parameter of block scales (as DeepSeek-V3's released checkpoints store them), widened by
  `dsv3.dequantize` before an ordinary matmul. Running the pass again without it then quantises the activations
  and reads those stored weights directly (W8A8, as DeepSeek's inference code does).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from xdsl.context import Context
from xdsl.dialects.builtin import BFloat16Type, Float16Type, Float32Type, ModuleOp, TensorType
from xdsl.ir import Attribute, BlockArgument, SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern, op_type_rewrite_pattern
from xdsl.rewriter import InsertPoint, Rewriter

from ..dialects import dsv3
from ..dialects.quant import (
    FP8_TYPES,
    DequantizeOp,
    FP8MatmulOp,
    QuantAttr,
    QuantizeOp,
    fp8_name,
    scale_shape,
)


def weight_param(value: SSAValue) -> dsv3.ParamOp | None:
    """The parameter a weight operand reads, seen through layer-stack regions, transposes and dequantisation."""
    while True:
        owner = value.owner
        if isinstance(owner, dsv3.ParamOp):
            return owner
        if isinstance(value, BlockArgument):
            stack = value.block.parent_op()
            if not isinstance(stack, dsv3.LayerStackOp):
                return None
            value = stack.operands[value.index]
        elif isinstance(owner, dsv3.TransposeOp):
            value = owner.x
        elif isinstance(owner, DequantizeOp):
            value = owner.values
        else:
            return None


@dataclass(frozen=True)
class Recipe:
    """The tilings the pass writes, from its options."""

    activations: QuantAttr
    weights: QuantAttr
    gradients: QuantAttr
    exclude: tuple[str, ...]

    def matching(self, weights: QuantAttr) -> tuple[QuantAttr, QuantAttr]:
        """Activation and gradient tilings for weights stored with other blocks than this recipe's."""
        if weights.per_tensor:
            return QuantAttr(self.activations.fmt, [0, 0], weights.rule.data), QuantAttr(
                self.gradients.fmt, [0, 0], weights.rule.data
            )
        return (
            QuantAttr(self.activations.fmt, [1, weights.rows], self.activations.rule.data),
            QuantAttr(self.gradients.fmt, [1, weights.cols], self.gradients.rule.data),
        )

    def excluded(self, param: dsv3.ParamOp | None) -> bool:
        if param is None:
            return False
        names = (param.pname, *param.axis_names)
        return any(fnmatchcase(name, pattern) for pattern in self.exclude for name in names)


_WIDE_FLOATS = (Float32Type, BFloat16Type, Float16Type)


def _wide_float(value: SSAValue) -> bool:
    """A tensor of f32/bf16/f16: something to quantise (not already FP8, not integers)."""
    return isinstance(value.type, TensorType) and isinstance(value.type.element_type, _WIDE_FLOATS)


def _quantize(rewriter: PatternRewriter, value: SSAValue, quant: QuantAttr) -> tuple[SSAValue, SSAValue]:
    op = QuantizeOp(value, quant)
    rewriter.insert(op)
    if value.name_hint:
        op.results[0].name_hint = f"{value.name_hint}_fp8"
        op.results[1].name_hint = f"{value.name_hint}_scale"
    return op.results[0], op.results[1]


class QuantizeMatmul(RewritePattern):
    """matmul -> quantize x, quantize w (or read stored FP8 weights), fp8_matmul."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.MatmulOp, rewriter: PatternRewriter) -> None:
        r = self.recipe
        if r.excluded(weight_param(op.w)) or not _wide_float(op.x):
            return
        stored = op.w.owner
        if isinstance(stored, DequantizeOp):  # FP8 weights from storage: use them as they are...
            w_quant = stored.quant
            x_quant, g_quant = r.matching(w_quant)  # ...and tile the activations to their blocks
            xq, xs = _quantize(rewriter, op.x, x_quant)
            wq, ws = stored.values, stored.scales
        else:
            w_quant, x_quant, g_quant = r.weights, r.activations, r.gradients
            xq, xs = _quantize(rewriter, op.x, x_quant)
            wq, ws = _quantize(rewriter, op.w, w_quant)
        matmul = FP8MatmulOp(xq, xs, wq, ws, op.result.type, x_quant=x_quant, w_quant=w_quant, grad_quant=g_quant)
        rewriter.replace(op, matmul)


class QuantizeExperts(RewritePattern):
    """Marks `dsv3.experts` to run its grouped GEMMs in FP8: the same op, its quantisation attributes set (so its
    chunks, capacity and kernel stay as they are)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.ExpertsOp, rewriter: PatternRewriter) -> None:
        r = self.recipe
        if op.quantized or any(r.excluded(weight_param(w)) for w in (op.w_gate, op.w_up, op.w_down)):
            return
        op.x_quant, op.w_quant, op.grad_quant = r.activations, r.weights, r.gradients
        rewriter.notify_op_modified(op)


def _new_param(like: dsv3.ParamOp, name: str, ty: TensorType, init: str) -> dsv3.ParamOp:
    std = like.std.value.data if init == "normal" and like.std is not None else None
    return dsv3.ParamOp(name, ty, like.axis_names, init, std, trainable=False)


def store_weight_fp8(param: dsv3.ParamOp, quant: QuantAttr) -> None:
    """Makes a weight parameter FP8 storage with block scales (`<name>.scale`, one per block of each matrix, per
    layer and per expert where the weight has those axes), widened by `dsv3.dequantize` where it is used. Layer
    stacks pass the values and a new stacked scale operand to their region."""
    if fp8_name(param.result.type.element_type) is not None:
        return  # already stored in FP8
    shape = dsv3.shape_of(param.result)
    uses = [(use.operation, use.index) for use in param.result.uses]
    stacked = any(isinstance(user, dsv3.LayerStackOp) for user, _ in uses)
    local = shape[1:] if stacked else shape  # what one layer sees
    scales = scale_shape(local, quant)
    values_param = _new_param(param, param.pname, TensorType(quant.dtype, shape), param.init.data)
    scale_shape_full = (shape[0], *scales) if stacked else scales
    scale_param = _new_param(param, f"{param.pname}.scale", TensorType(Float32Type(), scale_shape_full), "ones")
    values_param.result.name_hint = param.result.name_hint
    scale_param.result.name_hint = f"{param.result.name_hint or 'w'}_scale"
    Rewriter.insert_op([values_param, scale_param], InsertPoint.before(param))
    wide = param.result.type
    assert isinstance(wide, TensorType)
    for user, index in uses:
        if isinstance(user, dsv3.LayerStackOp):
            block = user.body.block
            values_arg = Rewriter.replace_value_with_new_type(block.args[index], TensorType(quant.dtype, local))
            scale_arg = block.insert_arg(TensorType(Float32Type(), scales), len(block.args))
            scale_arg.name_hint = f"{values_arg.name_hint or 'w'}_scale"
            operands = list(user.operands)
            operands[index] = values_param.result
            user.operands = [*operands, scale_param.result]
            _widen_uses(values_arg, scale_arg, quant, wide.element_type, InsertPoint.at_start(block))
        else:
            user.operands[index] = values_param.result
    _widen_uses(values_param.result, scale_param.result, quant, wide.element_type, InsertPoint.after(scale_param))
    _erase(param)


def _widen_uses(values: SSAValue, scales: SSAValue, quant: QuantAttr, wide: Attribute, where: InsertPoint) -> None:
    """Every use of stored FP8 `values` (other than layer stacks, which pass them on) reads them dequantised."""
    users = [use for use in values.uses if not isinstance(use.operation, dsv3.LayerStackOp | DequantizeOp)]
    if not users:
        return
    deq = DequantizeOp(values, scales, quant, wide)
    Rewriter.insert_op(deq, where)
    deq.result.name_hint = f"{values.name_hint or 'w'}_wide"
    for use in users:
        use.operation.operands[use.index] = deq.result


@dataclass(frozen=True)
class FP8Quant(ModulePass):
    name = "dsv3-fp8-quant"

    block: int = 128
    fwd: str = "e4m3"
    bwd: str = "e4m3"
    pow2_scales: bool = False
    per_tensor: bool = False
    exclude: tuple[str, ...] = ("vocab",)
    experts: bool = True
    weights_only: bool = False

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"dsv3-fp8-quant: block must be at least 1, got {self.block}")
        for option in ("fwd", "bwd"):
            if getattr(self, option) not in FP8_TYPES:
                raise ValueError(f"dsv3-fp8-quant: {option} must be one of {', '.join(FP8_TYPES)}")

    def recipe(self) -> Recipe:
        rule = "pow2" if self.pow2_scales else "amax"
        b = self.block
        if self.per_tensor:
            tiles = ([0, 0], [0, 0], [0, 0])
        else:
            tiles = ([1, b], [b, b], [1, b])
        exclude = () if self.exclude == ("none",) else self.exclude
        return Recipe(
            QuantAttr(self.fwd, tiles[0], rule),
            QuantAttr(self.fwd, tiles[1], rule),
            QuantAttr(self.bwd, tiles[2], rule),
            exclude,
        )

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        recipe = self.recipe()
        if self.weights_only:
            weights: list[SSAValue] = []
            for user in op.walk():
                if isinstance(user, dsv3.MatmulOp):
                    weights.append(user.w)
                elif isinstance(user, dsv3.ExpertsOp) and self.experts:
                    weights += [user.w_gate, user.w_up, user.w_down]
            params = {id(p): p for w in weights if _plain_weight(w) and (p := weight_param(w)) is not None}
            for param in params.values():
                if not recipe.excluded(param):
                    store_weight_fp8(param, recipe.weights)
            return
        patterns: list[RewritePattern] = [QuantizeMatmul(recipe)]
        if self.experts:
            patterns.append(QuantizeExperts(recipe))
        for pattern in patterns:
            PatternRewriteWalker(pattern, apply_recursively=False).rewrite_module(op)
        for dead in [d for d in op.walk() if isinstance(d, DequantizeOp) and not d.result.uses]:
            _erase(dead)  # stored FP8 weights are now read directly


def _erase(op) -> None:
    op.detach()
    op.erase()


def _plain_weight(value: SSAValue) -> bool:
    """A weight read straight from a parameter (possibly through a layer stack), not computed (a tied head's
    transpose)."""
    owner = value.owner
    return isinstance(owner, dsv3.ParamOp | DequantizeOp) or isinstance(value, BlockArgument)

