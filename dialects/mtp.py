"""Which ops of a function make up its multi-token-prediction modules, read off the IR's structure.

Nothing in the IR is marked "MTP" by name: the main model is what the function's `logits` (and `hidden`) outputs
need, and an MTP module is what its `mtp_loss` outputs need beyond that. An output or a router-bias update belongs to
MTP when its value depends on an MTP op (the MTP module's balance loss, expert load and bias update read its layer
stack). `dsv3-drop-mtp` and `dsv3-mtp-draft` cut along this line, and reports count MTP parameters apart by it; a
renamed parameter or output cannot move anything across it.
"""

from __future__ import annotations

from collections.abc import Iterable

from xdsl.dialects.func import FuncOp
from xdsl.ir import Block, Operation, OpResult, SSAValue

from .dsv3 import BiasUpdateOp, OutputOp, OutputRole


def outputs(block: Block, *roles: OutputRole) -> list[OutputOp]:
    """The `dsv3.output`s of `block` with one of `roles`, in program order."""
    return [op for op in block.ops if isinstance(op, OutputOp) and op.output_role in roles]


def backward_slice(roots: Iterable[SSAValue], stop: set[SSAValue]) -> set[Operation]:
    """The top-level ops of a function that `roots` depend on (through nested regions too), not looking past
    `stop`."""
    seen: set[Operation] = set()
    work = list(roots)
    while work:
        value = work.pop()
        if value in stop or not isinstance(value, OpResult):
            continue
        op = value.owner
        while op.parent_op() is not None and not isinstance(op.parent_op(), FuncOp):
            op = op.parent_op()  # a value defined inside a region belongs to its top-level op
        assert op is not None
        if op in seen:
            continue
        seen.add(op)
        for inner in op.walk():
            work.extend(v for v in inner.operands if not (isinstance(v, OpResult) and op.is_ancestor(v.owner)))
    return seen


def main_values(block: Block) -> set[SSAValue]:
    """The values of the main model: the block's arguments and the results of what its logits and hidden state
    need."""
    main = backward_slice([o.value for o in outputs(block, OutputRole.LOGITS, OutputRole.HIDDEN)], set())
    return {r for op in main for r in op.results} | set(block.args)


def mtp_ops(block: Block) -> set[Operation]:
    """The top-level ops of `block` that only its MTP modules need (empty when it has no `mtp_loss` output)."""
    losses = outputs(block, OutputRole.MTP_LOSS)
    if not losses:
        return set()
    return backward_slice([o.value for o in losses], main_values(block))


def mtp_sinks(block: Block) -> list[OutputOp | BiasUpdateOp]:
    """The outputs and router-bias updates of `block` that belong to its MTP modules."""
    mtp = mtp_ops(block)
    if not mtp:
        return []
    main = main_values(block)
    sinks = [op for op in block.ops if isinstance(op, OutputOp | BiasUpdateOp)]
    return [op for op in sinks if backward_slice(op.operands, main) & mtp]
