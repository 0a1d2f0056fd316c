"""`dsv3-mtp-draft`: keeps the multi-token-prediction module for inference, as a draft model of its own.

In training IR the MTP module is part of `@model`: it reads the main model's last hidden state `h` and the
embedding of the next token (a token window at offset 1) and only feeds a loss. For speculative decoding
(REFERENCE.md section 4) it must run on tokens the main model has just chosen, so this pass outlines it:

    func.func @model(%tokens)              ... dsv3.output %h {name = "hidden", role = #dsv3<role hidden>}
    func.func @mtp(%hidden, %next_tokens)  ... dsv3.output %logits {name = "logits", role = #dsv3<role logits>}

`@mtp` is exactly the MTP ops of `@model` (its layer stack, norms, `eh_proj`, the shared embedding and head
re-declared by name), with `h` read from `%hidden` and the offset-1 token window from `%next_tokens`; position i
predicts token i+2. Everything else of MTP (its loss, balance loss, load, bias update) is dropped, as
`dsv3-drop-mtp` does. `dsv3-kv-cache` then gives `@mtp` a cache of its own. Depth 1 (DeepSeek-V3's) only.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerType, ModuleOp, TensorType
from xdsl.dialects.func import FuncOp, ReturnOp
from xdsl.ir import Block, Operation, OpResult, Region, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from ..dialects import dsv3
from ..dialects.dsv3 import OutputRole
from ..dialects.mtp import backward_slice, main_values, mtp_sinks, outputs
from ..frontend.errors import UserError
from .dce import DeadCodeElimination


def _func(module: ModuleOp, name: str) -> FuncOp | None:
    return next((op for op in module.ops if isinstance(op, FuncOp) and op.sym_name.data == name), None)


@dataclass(frozen=True)
class MTPDraft(ModulePass):
    """Outlines the (depth-1) MTP module of `@model` into `@mtp(%hidden, %next_tokens)`."""

    name = "dsv3-mtp-draft"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        model = _func(op, "model")
        if model is None or _func(op, "mtp") is not None:
            raise UserError("dsv3-mtp-draft: needs a module with @model and no @mtp yet")
        block = model.body.block
        losses, logits = outputs(block, OutputRole.MTP_LOSS), outputs(block, OutputRole.LOGITS)
        if len(losses) != 1 or len(logits) != 1:
            raise UserError(f"dsv3-mtp-draft: needs one main model and one MTP module, found {len(losses)} MTP")
        ce = losses[0].value.owner
        assert isinstance(ce, dsv3.CrossEntropyOp)
        main = main_values(block)
        mtp_ops = backward_slice([ce.logits], main)

        hidden_type = None
        boundary: dict[SSAValue, str] = {}
        for inner in [o for o in block.ops if o in mtp_ops]:  # program order, so the output is deterministic
            for nested in inner.walk():
                for value in nested.operands:
                    if value in main:
                        boundary[value] = type(value.owner).__name__ if isinstance(value, OpResult) else "arg"
        mtp_block = Block(arg_types=[TensorType(IntegerType(32), [dsv3.DYN, dsv3.DYN])])
        mapping: dict[SSAValue, SSAValue] = {}
        body: list[Operation] = []
        next_tokens = mtp_block.args[0]
        next_tokens.name_hint = "next_tokens"
        for value, kind in boundary.items():
            owner = value.owner if isinstance(value, OpResult) else None
            if isinstance(owner, dsv3.ParamOp):
                clone = owner.clone()
                body.append(clone)
                mapping[value] = clone.result
            elif isinstance(owner, dsv3.PositionsOp):
                positions = dsv3.PositionsOp(next_tokens)
                positions.result.name_hint = "positions"
                body.append(positions)
                mapping[value] = positions.result
            elif isinstance(owner, dsv3.LayerStackOp) and value is owner.results[0] and hidden_type is None:
                hidden_type = value.type
                mapping[value] = mtp_block.insert_arg(value.type, 0)
                mapping[value].name_hint = "hidden"
                hidden = value
            elif kind == "arg":
                continue  # the token batch: only read through the offset-1 window handled below
            else:
                raise UserError(f"dsv3-mtp-draft: the MTP module reads an unexpected main-model value ({kind})")
        if hidden_type is None:
            raise UserError("dsv3-mtp-draft: the MTP module does not read the main model's hidden state")

        for inner in list(block.ops):
            if inner not in mtp_ops:
                continue
            if isinstance(inner, dsv3.TokenWindowOp):
                if inner.int_prop("offset") != 1:
                    raise UserError("dsv3-mtp-draft: only depth 1 is supported (a token window past offset 1)")
                mapping[inner.ids] = next_tokens
                continue
            if inner is ce or inner in losses:
                continue
            body.append(inner.clone(mapping))
        draft_logits = mapping[ce.logits]
        body += [dsv3.OutputOp(draft_logits, "logits", OutputRole.LOGITS), ReturnOp()]
        mtp_block.add_ops(body)
        Rewriter.insert_op(FuncOp.from_region("mtp", [a.type for a in mtp_block.args], [], Region(mtp_block)),
                           InsertPoint.after(model))

        for sink in mtp_sinks(block):  # the main model keeps everything but MTP's sinks, and reports h
            Rewriter.erase_op(sink)
        output = dsv3.OutputOp(hidden, "hidden", OutputRole.HIDDEN)
        Rewriter.insert_op(output, InsertPoint.after(logits[0]))
        DeadCodeElimination().apply(ctx, op)
