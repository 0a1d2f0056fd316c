"""Rules about a whole dsv3 module, beyond what any one op can verify: one optimizer, one layout, `@model`'s tokens,
parameter names that identify one array, one output of each unique role (`logits`, `loss`, `hidden`) per function,
bias updates that name a router bias of the right shape, sizes within bounds.

`verify_ir` runs them after the per-op verifiers, so a hand-edited file that breaks one is refused at the op to
blame instead of failing inside the lowering (a `KeyError` for a misspelt bias) or training to NaN (two parameters
sharing a name and so one array)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from xdsl.dialects.builtin import ModuleOp, TensorType
from xdsl.dialects.func import FuncOp
from xdsl.ir import Operation

from ..frontend.limits import MAX_TENSOR_ELEMENTS, MAX_TOTAL_PARAMS
from . import dsv3
from .sharding import ParallelOp


def module_problems(module: ModuleOp) -> Iterator[tuple[Operation, str]]:
    """Each broken rule as (the op to blame, a message); the caller reports the first."""
    yield from _optimizer_and_model(module)
    yield from _unique_roles(module)
    params = yield from _params(module)
    yield from _bias_updates(module, params)


def _optimizer_and_model(module: ModuleOp) -> Iterator[tuple[Operation, str]]:
    """At most one optimizer (IR for inference or for one pass's test may have none) and one layout, and `@model`'s
    first argument the token batch, where there is a `@model` (the runtime says so when it needs one)."""
    optimizers = [op for op in module.ops if isinstance(op, dsv3.OptimizerOp)]
    for extra in optimizers[1:]:
        yield extra, "a second dsv3.optimizer: a module declares one"
    for extra in [op for op in module.ops if isinstance(op, ParallelOp)][1:]:
        yield extra, "a second dsv3.parallel: a module declares one layout"
    models = [op for op in module.ops if isinstance(op, FuncOp) and op.sym_name.data == "model"]
    if not models:
        return
    args = models[0].body.block.args if models[0].body.blocks else ()
    if not args or not isinstance(args[0].type, TensorType) or len(dsv3.shape_of(args[0])) != 2:
        yield models[0], "@model's first argument must be the tokens, a tensor<?x?xi32>"


def _unique_roles(module: ModuleOp) -> Iterator[tuple[Operation, str]]:
    """A consumer asks a function for "the" logits (decoding) or "the" loss: a second one would be ignored."""
    for func in (op for op in module.ops if isinstance(op, FuncOp) and op.body.blocks):
        first: dict[dsv3.OutputRole, dsv3.OutputOp] = {}
        for op in func.body.block.ops:
            if isinstance(op, dsv3.OutputOp) and op.output_role in dsv3.UNIQUE_ROLES:
                earlier = first.setdefault(op.output_role, op)
                if earlier is not op:
                    yield op, (f"'{op.output_name.data}' is a second {op.output_role} output of "
                               f"@{func.sym_name.data} (the first is '{earlier.output_name.data}')")


def _params(module: ModuleOp) -> Iterator[tuple[Operation, str]]:
    """Names unique within a function (other functions may re-declare a shared parameter with the same type),
    tensor sizes and the total within the limits; returns the parameters by name."""
    params: dict[str, dsv3.ParamOp] = {}
    total = 0
    for func in (op for op in module.ops if isinstance(op, FuncOp)):
        seen: set[str] = set()
        for op in dsv3.walk_params(func):
            name = op.pname
            if name in seen:
                yield op, f"parameter '{name}' is declared twice (each name is one array)"
            seen.add(name)
            if name in params:
                if params[name].result.type != op.result.type:
                    yield op, f"parameter '{name}' is re-declared with another type than in an earlier function"
                continue
            params[name] = op
            elements = math.prod(dsv3.shape_of(op.result))
            if elements > MAX_TENSOR_ELEMENTS:
                yield op, f"parameter '{name}' has {elements:.3g} elements, more than the limit 2^48"
            total += elements
            if total > MAX_TOTAL_PARAMS:
                yield op, f"the model has more than 2^50 parameters (at '{name}')"
                return params
    return params


def _bias_updates(module: ModuleOp, params: dict[str, dsv3.ParamOp]) -> Iterator[tuple[Operation, str]]:
    for op in module.walk():
        if not isinstance(op, dsv3.BiasUpdateOp):
            continue
        target = params.get(op.param.data)
        if target is None:
            yield op, f"updates '{op.param.data}', which is not a parameter"
        elif target.bool_prop("trainable"):
            yield op, f"updates '{op.param.data}', a trainable parameter (the rule is for non-trainable biases)"
        elif dsv3.shape_of(target.result) != dsv3.shape_of(op.load):
            load, bias = dsv3.shape_of(op.load), dsv3.shape_of(target.result)
            yield op, f"load of shape {_fmt(load)} does not match '{op.param.data}' of shape {_fmt(bias)}"
        elif not (isinstance(op.load.owner, dsv3.LayerStackOp) and any(
            isinstance(v.owner, dsv3.ParamOp) and v.owner.pname == op.param.data for v in op.load.owner.operands
        )):
            # The load must be the one the biased router produced: which module (main or MTP) a bias update
            # belongs to is read off the stack (`dialects/mtp.py`), and a mismatch would steer the wrong router.
            yield op, f"updates '{op.param.data}', which the layer stack that computes the load does not read"


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join("?" if d == dsv3.DYN else str(d) for d in shape) or "scalar"
