"""`dsv3-mla-absorb`: folds MLA's key and value up-projections into the query and the output (REFERENCE.md section 2).

The builder emits naive MLA: `c_kv` is up-projected by `wkv_b` to per-head keys and values, then attended over:

    %kv = dsv3.matmul %c_kv, %wkv_b          // [B,T,C] x [C, H*(n+v)]
    %kv_h = dsv3.split_heads %kv             // [B,T,H,n+v]
    %k_nope = dsv3.slice %kv_h [0:n]   ;   %v = dsv3.slice %kv_h [n:n+v]
    %o = dsv3.attention %q_nope, %q_pe, %k_nope, %k_pe, %v

Both products are re-associated. Scores: q_nope . (c_kv W_UK) = (q_nope W_UK^T) . c_kv; output:
softmax(.) (c_kv W_UV) = (softmax(.) c_kv) W_UV. With W_UK and W_UV viewed out of `wkv_b` as [C, H, n] and [C, H, v]:

    %w = dsv3.split_heads %wkv_b             // [C, H, n+v]: a view of the parameter, no copy
    %w_uk = dsv3.slice %w [0:n]   ;   %w_uv = dsv3.slice %w [n:n+v]
    %q_lat = dsv3.einsum %q_nope, %w_uk {"bshd,chd->bshc"}
    %o_lat = dsv3.latent_attention %q_lat, %q_pe, %c_kv, %k_pe, %pos, %pos
    %o = dsv3.einsum %o_lat, %w_uv {"bshc,chd->bshd"}

Attention then reads only `c_kv` and `k_pe` (C + r = 576 values per token and layer for V3) instead of per-head keys
and values (H * (n + r + v) = 40,960), which is what `dsv3-kv-cache` caches. The per-head up-projected keys and
values are no longer computed at all; dead-code elimination removes the old chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, TensorType
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)

from ..dialects import dsv3
from ..dialects.latent import EinsumOp, LatentAttentionOp
from .dce import DeadCodeElimination


@dataclass(frozen=True)
class _UpProjection:
    """The naive chain feeding one attention op: latent, the `wkv_b` weight, head count and split widths."""

    c_kv: SSAValue
    wkv_b: SSAValue
    heads: int
    nope: int
    v: int


def _match_up_projection(op: dsv3.AttentionOp) -> _UpProjection | None:
    k_slice, v_slice = op.k_nope.owner, op.v.owner
    if not (isinstance(k_slice, dsv3.SliceOp) and isinstance(v_slice, dsv3.SliceOp)):
        return None
    if k_slice.x is not v_slice.x or k_slice.int_prop("start") != 0:
        return None
    nope, v_width = k_slice.int_prop("size"), v_slice.int_prop("size")
    split = k_slice.x.owner
    if not isinstance(split, dsv3.SplitHeadsOp) or v_slice.int_prop("start") != nope:
        return None
    heads = split.int_prop("heads")
    if dsv3.shape_of(split.result)[-1] != nope + v_width:
        return None
    matmul = split.x.owner
    if not isinstance(matmul, dsv3.MatmulOp):
        return None
    return _UpProjection(matmul.x, matmul.w, heads, nope, v_width)


def _positions(op: dsv3.AttentionOp) -> SSAValue | None:
    """The positions the query's rope part was rotated at (the causal mask of the latent form is by position)."""
    rope = op.q_pe.owner
    return rope.positions if isinstance(rope, dsv3.RopeOp) else None


class AbsorbUpProjection(RewritePattern):
    """One naive `dsv3.attention` and its `wkv_b` chain -> einsum, `dsv3.latent_attention`, einsum."""

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: dsv3.AttentionOp, rewriter: PatternRewriter) -> None:
        chain, positions = _match_up_projection(op), _positions(op)
        if chain is None or positions is None:
            return
        latent = dsv3.shape_of(chain.wkv_b)[0]
        h, n, v = chain.heads, chain.nope, chain.v
        act = op.q_nope.type
        assert isinstance(act, TensorType)
        batch, seq = dsv3.shape_of(op.q_nope)[:2]

        def new(built: Operation, name: str) -> SSAValue:
            rewriter.insert(built)
            built.results[0].name_hint = name
            return built.results[0]

        w = new(dsv3.SplitHeadsOp(chain.wkv_b, h), "w_ukv")
        w_uk = new(dsv3.SliceOp(w, 0, n), "w_uk")
        w_uv = new(dsv3.SliceOp(w, n, v), "w_uv")
        q_lat_type = TensorType(act.element_type, [batch, seq, h, latent])
        q_lat = new(EinsumOp(op.q_nope, w_uk, "bshd,chd->bshc", q_lat_type), "q_lat")
        o_lat = new(
            LatentAttentionOp(q_lat, op.q_pe, chain.c_kv, op.k_pe, positions, positions, op.float_prop("scale")),
            "o_lat",
        )
        out = EinsumOp(o_lat, w_uv, "bshc,chd->bshd", op.result.type)
        rewriter.replace(op, out)


@dataclass(frozen=True)
class MLAAbsorb(ModulePass):
    """Rewrites every naive MLA attention whose keys and values come from the `wkv_b` up-projection."""

    name = "dsv3-mla-absorb"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(AbsorbUpProjection(), apply_recursively=False).rewrite_module(op)
        DeadCodeElimination().apply(ctx, op)
