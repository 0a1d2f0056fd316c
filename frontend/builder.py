"""Builds dsv3 IR from a validated `ModelSpec`.

Every decision that the spec implies (per-parameter init std, the softmax scale with YaRN's mscale, which layers are
dense, the loss weights) is made here once and written into the IR as plain numbers, so the lowering needs nothing
but the IR and a hand-edited IR file means exactly what it says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

from xdsl.dialects.builtin import (
    BFloat16Type,
    Float16Type,
    Float32Type,
    IntegerType,
    ModuleOp,
    TensorType,
)
from xdsl.dialects.func import FuncOp, ReturnOp
from xdsl.ir import Attribute, Block, Operation, Region, SSAValue

from ..dialects import dsv3
from ..dialects.checks import module_problems
from ..dialects.sharding import ParallelOp
from .errors import SpecError
from .spec import AttentionSpec, ModelSpec, MoESpec

DYN = dsv3.DYN
F32 = Float32Type()
I32 = IntegerType(32)
_DTYPES: dict[str, Attribute] = {"f32": F32, "bf16": BFloat16Type(), "f16": Float16Type()}
_OpT = TypeVar("_OpT", bound=Operation)


@dataclass(frozen=True)
class ParamDecl:
    """One layer's parameter before stacking: local name, shape, logical axes and init."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"
    std: float | None = None
    trainable: bool = True


def _named(value: SSAValue, name: str) -> SSAValue:
    """Gives a value a readable SSA name in dumps (`%q_nope`); xDSL suffixes repeats (`%q_nope_1`)."""
    value.name_hint = name.replace(".", "_")
    return value


class _Emitter:
    """Appends ops to a block."""

    def __init__(self, block: Block, spec: ModelSpec):
        self.block = block
        self.spec = spec
        self.cdt = _DTYPES[spec.dtypes.compute]
        self.pdt = _DTYPES[spec.dtypes.params]

    def emit(self, op: _OpT) -> _OpT:
        self.block.add_op(op)
        return op

    def one(self, op: Operation) -> SSAValue:
        """Appends a single-result op and returns its result."""
        return self.emit(op).results[0]

    def param(self, decl: ParamDecl, prefix: str = "", stack: int = 0) -> SSAValue:
        shape = (stack, *decl.shape) if stack else decl.shape
        axes = ("layers", *decl.axes) if stack else decl.axes
        name = f"{prefix}{decl.name}"
        op = dsv3.ParamOp(name, TensorType(self.pdt, shape), axes, decl.init, decl.std, decl.trainable)
        return _named(self.one(op), name)

    # -- shared pieces ------------------------------------------------------------------------------------------

    def rms_norm(self, x: SSAValue, w: SSAValue) -> SSAValue:
        return self.one(dsv3.RMSNormOp(x, w, self.spec.norm_eps))

    def matmul(self, x: SSAValue, w: SSAValue, dtype: Attribute | None = None) -> SSAValue:
        return self.one(dsv3.MatmulOp(x, w, dtype))

    def slice(self, x: SSAValue, start: int, size: int) -> SSAValue:
        return self.one(dsv3.SliceOp(x, start, size))

    def swiglu_ffn(self, x: SSAValue, gate: SSAValue, up: SSAValue, down: SSAValue) -> SSAValue:
        g, u = self.matmul(x, gate), self.matmul(x, up)
        return self.matmul(self.one(dsv3.SwiGLUOp(g, u)), down)

    def add(self, a: SSAValue, b: SSAValue) -> SSAValue:
        return self.one(dsv3.AddOp(a, b))


# ---------------------------------------------------------------------------------------------------------------
# Per-layer parameter lists
# ---------------------------------------------------------------------------------------------------------------


def _std(spec: ModelSpec, mla: bool = False, output: bool = False) -> float:
    if mla and spec.init.mla_std is not None:
        std = spec.init.mla_std
        return std / math.sqrt(2 * spec.layers) if output else std
    return spec.init.std


def attention_params(spec: ModelSpec) -> list[ParamDecl]:
    a, d = spec.attention, spec.dim
    qk = a.nope_dim + a.rope_dim
    mla = _std(spec, mla=True)
    decls = [ParamDecl("attn_norm", (d,), ("embed",), "ones")]
    if a.q_lora_rank:
        decls += [
            ParamDecl("wq_a", (d, a.q_lora_rank), ("embed", "q_lora"), std=mla),
            ParamDecl("q_norm", (a.q_lora_rank,), ("q_lora",), "ones"),
            ParamDecl("wq_b", (a.q_lora_rank, a.heads * qk), ("q_lora", "q_heads"), std=mla),
        ]
    else:
        decls.append(ParamDecl("wq", (d, a.heads * qk), ("embed", "q_heads"), std=mla))
    decls += [
        ParamDecl("wkv_a", (d, a.kv_lora_rank + a.rope_dim), ("embed", "kv_lora"), std=mla),
        ParamDecl("kv_norm", (a.kv_lora_rank,), ("kv_lora",), "ones"),
        ParamDecl("wkv_b", (a.kv_lora_rank, a.heads * (a.nope_dim + a.v_dim)), ("kv_lora", "kv_heads"), std=mla),
        ParamDecl("wo", (a.heads * a.v_dim, d), ("heads", "embed"), std=_std(spec, mla=True, output=True)),
        ParamDecl("ffn_norm", (d,), ("embed",), "ones"),
    ]
    return decls


def dense_ffn_params(spec: ModelSpec) -> list[ParamDecl]:
    assert spec.dense_ffn is not None
    d, f, std = spec.dim, spec.dense_ffn.hidden, spec.init.std
    return [
        ParamDecl("ffn_gate", (d, f), ("embed", "mlp"), std=std),
        ParamDecl("ffn_up", (d, f), ("embed", "mlp"), std=std),
        ParamDecl("ffn_down", (f, d), ("mlp", "embed"), std=std),
    ]


def moe_params(spec: ModelSpec) -> list[ParamDecl]:
    m = spec.moe
    assert m is not None
    d, e, f, std = spec.dim, m.experts, m.hidden, spec.init.std
    decls = [
        ParamDecl("router", (d, e), ("embed", "exp"), std=std),
        ParamDecl("router_bias", (e,), ("exp",), "zeros", trainable=False),
        ParamDecl("experts_gate", (e, d, f), ("exp", "embed", "mlp"), std=std),
        ParamDecl("experts_up", (e, d, f), ("exp", "embed", "mlp"), std=std),
        ParamDecl("experts_down", (e, f, d), ("exp", "mlp", "embed"), std=std),
    ]
    if m.shared:
        fs = m.shared * f
        decls += [
            ParamDecl("shared_gate", (d, fs), ("embed", "mlp"), std=std),
            ParamDecl("shared_up", (d, fs), ("embed", "mlp"), std=std),
            ParamDecl("shared_down", (fs, d), ("mlp", "embed"), std=std),
        ]
    return decls


def softmax_scale(a: AttentionSpec) -> float:
    """(nope + rope)^-0.5, times mscale^2 when YaRN extends the context (REFERENCE.md section 2)."""
    scale = (a.nope_dim + a.rope_dim) ** -0.5
    yarn = a.rope.yarn
    if yarn is not None and yarn.mscale_all_dim and yarn.factor > 1:
        m = 0.1 * yarn.mscale_all_dim * math.log(yarn.factor) + 1.0
        scale *= m * m
    return scale


# ---------------------------------------------------------------------------------------------------------------
# One layer, emitted into a region block
# ---------------------------------------------------------------------------------------------------------------


class _LayerEmitter(_Emitter):
    def __init__(self, block: Block, spec: ModelSpec, params: dict[str, SSAValue], positions: SSAValue):
        super().__init__(block, spec)
        self.p = params
        self.positions = positions

    def rope(self, x: SSAValue) -> SSAValue:
        r = self.spec.attention.rope
        layout = dsv3.RopeLayout(r.layout)
        y = r.yarn
        if y is None:
            return self.one(dsv3.RopeOp(x, self.positions, r.theta, layout))
        return self.one(dsv3.RopeOp(
            x, self.positions, r.theta, layout, yarn_factor=y.factor, yarn_original_len=int(y.original_len),
            yarn_beta_fast=y.beta_fast, yarn_beta_slow=y.beta_slow, yarn_mscale=y.mscale,
            yarn_mscale_all_dim=y.mscale_all_dim,
        ))

    def split_heads(self, x: SSAValue) -> SSAValue:
        return self.one(dsv3.SplitHeadsOp(x, self.spec.attention.heads))

    def attention(self, h: SSAValue) -> SSAValue:
        a, p = self.spec.attention, self.p
        x = self.rms_norm(h, p["attn_norm"])
        if a.q_lora_rank:
            c_q = _named(self.rms_norm(self.matmul(x, p["wq_a"]), p["q_norm"]), "c_q")
            q = self.matmul(c_q, p["wq_b"])
        else:
            q = self.matmul(x, p["wq"])
        q = _named(self.split_heads(q), "q")
        q_nope = _named(self.slice(q, 0, a.nope_dim), "q_nope")
        q_pe = _named(self.rope(self.slice(q, a.nope_dim, a.rope_dim)), "q_pe")
        kv = _named(self.matmul(x, p["wkv_a"]), "kv")
        c_kv = _named(self.rms_norm(self.slice(kv, 0, a.kv_lora_rank), p["kv_norm"]), "c_kv")
        k_pe = _named(self.rope(self.slice(kv, a.kv_lora_rank, a.rope_dim)), "k_pe")
        kv_up = self.split_heads(self.matmul(c_kv, p["wkv_b"]))
        k_nope = _named(self.slice(kv_up, 0, a.nope_dim), "k_nope")
        v = _named(self.slice(kv_up, a.nope_dim, a.v_dim), "v")
        o = self.one(dsv3.AttentionOp(q_nope, q_pe, k_nope, k_pe, v, softmax_scale(a)))
        o = self.one(dsv3.MergeHeadsOp(_named(o, "attn")))
        return _named(self.add(h, self.matmul(o, p["wo"])), "h")

    def moe(self, x: SSAValue, m: MoESpec) -> tuple[SSAValue, SSAValue, SSAValue]:
        p = self.p
        router = self.emit(dsv3.RouterOp(
            x, p["router"], p["router_bias"], score=dsv3.RouterScore(m.score), top_k=m.top_k, groups=m.groups,
            keep_groups=m.keep_groups, scale=m.scale, normalize=m.normalize,
        ))
        names = ("gate_w", "experts", "scores")
        weights, indices, scores = (_named(r, n) for r, n in zip(router.results, names, strict=True))
        y = self.one(dsv3.ExpertsOp(x, weights, indices, p["experts_gate"], p["experts_up"], p["experts_down"]))
        if m.shared:
            y = self.add(y, self.swiglu_ffn(x, p["shared_gate"], p["shared_up"], p["shared_down"]))
        balance = self.one(dsv3.BalanceLossOp(scores, indices, m.seq_aux))
        load = self.one(dsv3.ExpertLoadOp(indices, m.experts))
        return y, balance, load

    def layer(self, h: SSAValue, kind: str) -> list[SSAValue]:
        """Pre-norm residual layer: h + attn(norm(h)), then + ffn(norm(.)). Returns what the region yields."""
        h = self.attention(h)
        x = self.rms_norm(h, self.p["ffn_norm"])
        extra: list[SSAValue] = []
        if kind == "dense":
            y = self.swiglu_ffn(x, self.p["ffn_gate"], self.p["ffn_up"], self.p["ffn_down"])
        else:
            assert self.spec.moe is not None
            y, balance, load = self.moe(x, self.spec.moe)
            extra = [balance, load]
        h = _named(self.add(h, y), "h")
        if self.spec.grad_mask_threshold is not None:
            h = self.one(dsv3.GradMaskOp(h, self.spec.grad_mask_threshold))
        return [h, *extra]


def layer_params(spec: ModelSpec, kind: str) -> list[ParamDecl]:
    ffn = dense_ffn_params(spec) if kind == "dense" else moe_params(spec)
    return attention_params(spec) + ffn


def _emit_stack(
    em: _Emitter, h: SSAValue, positions: SSAValue, kind: str, prefix: str, count: int
) -> list[SSAValue]:
    """Declares the stacked parameters of `count` layers and the `dsv3.layer_stack` applying them."""
    decls = layer_params(em.spec, kind)
    stacked = [em.param(d, prefix, stack=count) for d in decls]
    block = Block(arg_types=[h.type, *(TensorType(em.pdt, d.shape) for d in decls)])
    _named(block.args[0], "h")
    names = {d.name: _named(arg, d.name) for d, arg in zip(decls, block.args[1:], strict=True)}
    yielded = _LayerEmitter(block, em.spec, names, positions).layer(block.args[0], kind)
    block.add_op(dsv3.YieldOp(yielded))
    result_types = [h.type] + [TensorType(v.type.element_type, [count, *dsv3.shape_of(v)]) for v in yielded[1:]]
    stack = dsv3.LayerStackOp(h, stacked, Region(block), count, kind, result_types)
    em.block.add_op(stack)
    return [_named(r, n) for r, n in zip(stack.results, ("h", "balance", "load"), strict=False)]


def _emit_moe_outputs(em: _Emitter, balance: SSAValue, load: SSAValue, bias_param: str, prefix: str) -> None:
    """The balance loss (summed over layers), the expert load and, when enabled, the router-bias update rule."""
    m = em.spec.moe
    assert m is not None
    total = em.one(dsv3.SumOp(balance))
    em.emit(dsv3.OutputOp(total, f"{prefix}balance_loss", dsv3.OutputRole.AUX_LOSS, 1.0))
    em.emit(dsv3.OutputOp(load, f"{prefix}expert_load", dsv3.OutputRole.METRIC))
    if m.router_bias and m.bias_rate:
        em.emit(dsv3.BiasUpdateOp(load, bias_param, m.bias_rate))


def build_ir(spec: ModelSpec) -> ModuleOp:
    """The whole model as a dsv3 module: an optimizer declaration, the layout of a `parallel` block, and
    `func.func @model(tokens)`."""
    o = spec.optimizer
    module = ModuleOp([])
    module.body.block.add_op(dsv3.OptimizerOp(
        kind=o.kind, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip=o.clip,
        moments=o.moments, grads=o.grads, schedule=o.schedule, warmup=int(o.warmup), decay_steps=int(o.decay_steps),
        min_lr_ratio=o.min_lr_ratio, ema_decay=o.ema_decay,
    ))
    if spec.parallel is not None:
        p = spec.parallel
        module.body.block.add_op(ParallelOp(p.mesh, p.shard_mode, p.remat, p.head_loss, p.target))
    func = FuncOp("model", ([TensorType(I32, [DYN, DYN])], []))
    module.body.block.add_op(func)
    block = func.body.block
    em = _Emitter(block, spec)
    tokens = _named(block.args[0], "tokens")
    std = spec.init.std

    ids, _ = em.emit(dsv3.TokenWindowOp(tokens, 0)).results
    positions = _named(em.one(dsv3.PositionsOp(_named(ids, "ids"))), "positions")
    table = em.param(ParamDecl("embed", (spec.vocab, spec.dim), ("vocab", "embed"), std=std))
    h = em.one(dsv3.EmbedOp(table, ids, em.cdt))

    if spec.dense_layers:
        (h,) = _emit_stack(em, h, positions, "dense", "dense.", spec.dense_layers)
    if spec.moe_layers:
        h, balance, load = _emit_stack(em, h, positions, "moe", "moe.", spec.moe_layers)
        _emit_moe_outputs(em, balance, load, "moe.router_bias", "")

    final_norm = em.param(ParamDecl("final_norm", (spec.dim,), ("embed",), "ones"))
    if spec.tied_head:
        head = em.one(dsv3.TransposeOp(table))
    else:
        head = em.param(ParamDecl("head", (spec.dim, spec.vocab), ("embed", "vocab"), std=std))
    logits = em.matmul(em.rms_norm(h, final_norm), head, dtype=F32)
    em.emit(dsv3.OutputOp(_named(logits, "logits"), "logits", dsv3.OutputRole.LOGITS))
    labels, label_mask = em.emit(dsv3.TokenWindowOp(tokens, 1)).results
    lm_loss = em.one(dsv3.CrossEntropyOp(logits, labels, label_mask))
    em.emit(dsv3.OutputOp(lm_loss, "lm_loss", dsv3.OutputRole.LOSS, 1.0))

    _emit_mtp(em, h, table, head, positions)
    block.add_op(ReturnOp())
    for _op, message in module_problems(module):
        # The spec's fields are each bounded; only their products can break a module-wide limit: blame the model.
        raise SpecError(message, spec.path, *spec.positions.get("model", (0, 0)))
    return module


def _emit_mtp(em: _Emitter, h: SSAValue, table: SSAValue, head: SSAValue, positions: SSAValue) -> None:
    """Multi-token prediction: module k predicts token i+k+1 from the previous module's hidden state and the
    embedding of token i+k, sharing the embedding and output head with the main model."""
    spec = em.spec
    depth, d = spec.mtp.depth, spec.dim
    kind = "dense" if spec.moe is None else "moe"
    for k in range(1, depth + 1):
        prefix = f"mtp.{k - 1}."
        enorm = em.param(ParamDecl("enorm", (d,), ("embed",), "ones"), prefix)
        hnorm = em.param(ParamDecl("hnorm", (d,), ("embed",), "ones"), prefix)
        eh_proj = em.param(ParamDecl("eh_proj", (2 * d, d), ("mlp", "embed"), std=spec.init.std), prefix)
        norm = em.param(ParamDecl("norm", (d,), ("embed",), "ones"), prefix)
        tokens = em.block.args[0]
        ids, _ = em.emit(dsv3.TokenWindowOp(tokens, k)).results
        e = em.rms_norm(em.one(dsv3.EmbedOp(table, ids, em.cdt)), enorm)
        joined = em.one(dsv3.ConcatOp(e, em.rms_norm(h, hnorm)))
        h = em.matmul(joined, eh_proj)
        outs = _emit_stack(em, h, positions, kind, f"{prefix}block.", 1)
        h = outs[0]
        logits = em.matmul(em.rms_norm(h, norm), head, dtype=F32)
        labels, label_mask = em.emit(dsv3.TokenWindowOp(tokens, k + 1)).results
        ce = em.one(dsv3.CrossEntropyOp(logits, labels, label_mask))
        em.emit(dsv3.OutputOp(ce, "mtp_loss", dsv3.OutputRole.MTP_LOSS, spec.mtp.weight / depth))
        if kind == "moe":
            _emit_moe_outputs(em, outs[1], outs[2], f"{prefix}block.router_bias", "mtp_")
