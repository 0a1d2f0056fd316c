"""Ops of the inference-time attention forms: a general `dsv3.einsum`, the absorbed (latent) MLA attention core, and
the naive core with an explicit position mask.

`dsv3-mla-absorb` rewrites `dsv3.attention` and the `wkv_b` up-projection feeding it into `einsum` +
`latent_attention` + `einsum` (REFERENCE.md section 2); `dsv3-kv-cache` then lets either attention form read keys
from a cache. Both attention ops mask by positions rather than by index, so queries and keys may come from different
steps: a key at position p is visible to a query at position q when 0 <= p <= q (a negative position marks an empty
or padding slot).
"""

from __future__ import annotations

import re

from xdsl.dialects.builtin import FloatAttr, StringAttr, TensorType
from xdsl.ir import Attribute, SSAValue
from xdsl.irdl import IRDLOperation, irdl_op_definition, operand_def, prop_def, result_def, traits_def
from xdsl.traits import Pure

from .dsv3 import DYN, _dims_match, _fmt, _Op, _same_shape, shape_of

_EQUATION = re.compile(r"^([a-z]+),([a-z]+)->([a-z]*)$")


def parse_equation(equation: str) -> tuple[str, str, str] | None:
    """(lhs, rhs, out) index strings of a two-operand einsum equation, or None when it is not one."""
    match = _EQUATION.match(equation.replace(" ", ""))
    return None if match is None else (match.group(1), match.group(2), match.group(3))


@irdl_op_definition
class EinsumOp(_Op):
    """Two-operand Einstein summation, `equation` as in `jnp.einsum` (lower-case letters, no ellipsis). Like
    `dsv3.matmul`, the second operand is cast to the first's dtype and the result type's dtype is the output's, so
    a re-associated projection (`q_nope . W_UK^T`) is one op on a parameter view."""

    name = "dsv3.einsum"
    a = operand_def(TensorType)
    b = operand_def(TensorType)
    equation = prop_def(StringAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, a: SSAValue, b: SSAValue, equation: str, result_type: Attribute):
        super().__init__(operands=[a, b], result_types=[result_type], properties={"equation": StringAttr(equation)})

    def verify_(self) -> None:
        parsed = parse_equation(self.equation.data)
        self.expect(parsed is not None, f"bad equation '{self.equation.data}' (expected 'ab,bc->ac' style)")
        assert parsed is not None
        lhs, rhs, out = parsed
        shapes = {"lhs": shape_of(self.a), "rhs": shape_of(self.b), "result": shape_of(self.result)}
        sizes: dict[str, int] = {}
        for where, labels in (("lhs", lhs), ("rhs", rhs), ("result", out)):
            shape = shapes[where]
            self.expect(len(labels) == len(shape), f"{where} '{labels}' names {len(labels)} axes of {_fmt(shape)}")
            self.expect(len(set(labels)) == len(labels), f"{where} '{labels}' repeats an axis")
            for label, dim in zip(labels, shape, strict=True):
                known = sizes.get(label, DYN)
                self.expect(_dims_match(known, dim), f"axis '{label}' is {known} in one place and {dim} in another")
                if dim != DYN:
                    sizes[label] = dim
        self.expect(set(out) <= set(lhs) | set(rhs), f"result axes '{out}' must come from the operands")


def _check_attention(op: _Op, q: TensorType, q_pe: TensorType, k_pe: TensorType, q_pos, k_pos, keys) -> None:
    qs, qp, kp = shape_of(q), shape_of(q_pe), shape_of(k_pe)
    op.expect(len(qs) == 4 and len(qp) == 4 and len(kp) == 3, "queries must be [B,S,H,d] and k_pe [B,T,r]")
    op.expect(qs[2] == qp[2], "the two query parts must have the same number of heads")
    op.expect(qp[3] == kp[2], f"q_pe width {qp[3]} != k_pe width {kp[2]}")
    op.expect(_same_shape(shape_of(q_pos), qs[:2]), f"q_pos must be [B,S], got {_fmt(shape_of(q_pos))}")
    op.expect(_same_shape(shape_of(k_pos), kp[:2]), f"k_pos must be [B,T], got {_fmt(shape_of(k_pos))}")
    for key in keys:
        op.expect(_same_shape(shape_of(key)[:2], kp[:2]), "keys and values must share [B,T] with k_pe")
    op.expect(op.float_prop("scale") > 0, "scale must be positive")


@irdl_op_definition
class LatentAttentionOp(_Op):
    """Absorbed MLA attention core over the latent cache: scores = (q_lat . c_kv + q_pe . k_pe) * scale, masked by
    positions, softmax in float32, then the probabilities applied to c_kv itself. q_lat [B,S,H,C] (q_nope with W_UK
    folded in), q_pe [B,S,H,r], c_kv [B,T,C], k_pe [B,T,r], q_pos [B,S], k_pos [B,T] -> o_lat [B,S,H,C] (W_UV is
    applied afterwards)."""

    name = "dsv3.latent_attention"
    q_lat = operand_def(TensorType)
    q_pe = operand_def(TensorType)
    c_kv = operand_def(TensorType)
    k_pe = operand_def(TensorType)
    q_pos = operand_def(TensorType)
    k_pos = operand_def(TensorType)
    scale = prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, q_lat: SSAValue, q_pe: SSAValue, c_kv: SSAValue, k_pe: SSAValue, q_pos: SSAValue, k_pos: SSAValue,
        scale: float,
    ):
        super().__init__(
            operands=[q_lat, q_pe, c_kv, k_pe, q_pos, k_pos], result_types=[q_lat.type],
            properties={"scale": FloatAttr(scale, 64)},
        )

    def verify_(self) -> None:
        _check_attention(self, self.q_lat, self.q_pe, self.k_pe, self.q_pos, self.k_pos, [self.c_kv])
        latent = shape_of(self.c_kv)[-1]
        self.expect(shape_of(self.q_lat)[3] == latent, f"q_lat width {shape_of(self.q_lat)[3]} != c_kv {latent}")
        self.expect(_same_shape(shape_of(self.result), shape_of(self.q_lat)), "result must have q_lat's shape")


@irdl_op_definition
class MaskedAttentionOp(_Op):
    """The naive MLA attention core (per-head keys and values, as `dsv3.attention`) with a position mask, so the keys
    can be a cache: q_nope [B,S,H,n], q_pe [B,S,H,r], k_nope [B,T,H,n], k_pe [B,T,r], v [B,T,H,dv], q_pos [B,S],
    k_pos [B,T] -> [B,S,H,dv]."""

    name = "dsv3.masked_attention"
    q_nope = operand_def(TensorType)
    q_pe = operand_def(TensorType)
    k_nope = operand_def(TensorType)
    k_pe = operand_def(TensorType)
    v = operand_def(TensorType)
    q_pos = operand_def(TensorType)
    k_pos = operand_def(TensorType)
    scale = prop_def(FloatAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(
        self, q_nope: SSAValue, q_pe: SSAValue, k_nope: SSAValue, k_pe: SSAValue, v: SSAValue, q_pos: SSAValue,
        k_pos: SSAValue, scale: float,
    ):
        super().__init__(
            operands=[q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos], result_types=[v.type],
            properties={"scale": FloatAttr(scale, 64)},
        )

    def verify_(self) -> None:
        _check_attention(self, self.q_nope, self.q_pe, self.k_pe, self.q_pos, self.k_pos, [self.k_nope, self.v])
        qn, kn, v = shape_of(self.q_nope), shape_of(self.k_nope), shape_of(self.v)
        self.expect(len(kn) == 4 and len(v) == 4, "k_nope and v must be [B,T,H,d]")
        self.expect(qn[2] == kn[2] == v[2], "q, k and v must have the same number of heads")
        self.expect(qn[3] == kn[3], f"q_nope width {qn[3]} != k_nope width {kn[3]}")
        expected = (*qn[:3], v[3])
        self.expect(_same_shape(shape_of(self.result), expected), f"result must be {_fmt(expected)}")


LATENT_OPS: list[type[IRDLOperation]] = [EinsumOp, LatentAttentionOp, MaskedAttentionOp]
"""Listed in `dialects/dialect.py`."""
