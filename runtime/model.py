"""The model function of a dsv3 module: parameters and tokens in, named outputs and bias updates out."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from xdsl.dialects.builtin import ModuleOp
from xdsl.dialects.func import FuncOp

from ..dialects import dsv3
from ..frontend.errors import UserError
from .lower import LoweringContext, lower_block


@dataclass(frozen=True)
class ParamInfo:
    """What the IR declares about one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: jnp.dtype
    axes: tuple[str, ...]
    init: str
    std: float
    trainable: bool


def model_func(module: ModuleOp) -> FuncOp:
    """The `@model` function of a dsv3 module."""
    for op in module.ops:
        if isinstance(op, FuncOp) and op.sym_name.data == "model":
            return op
    raise UserError("the module has no func.func @model")


def param_infos(module: ModuleOp) -> dict[str, ParamInfo]:
    """Every parameter the model declares, by name, in program order. Functions beside `@model` (the MTP draft
    `@mtp` of speculative decoding) may re-declare a shared parameter (embedding, head): one name, one array."""
    from .lower.dtypes import result_dtype

    infos: dict[str, ParamInfo] = {}
    for op in dsv3.walk_params(module):
        infos[op.pname] = ParamInfo(
            op.pname, dsv3.shape_of(op.result), result_dtype(op.result), op.axis_names, op.init.data,
            0.0 if op.std is None else op.std.value.data, op.bool_prop("trainable"),
        )
    return infos


@partial(jax.tree_util.register_dataclass, data_fields=["loss", "metrics", "bias_loads"], meta_fields=["bias_rates"])
@dataclass
class ModelOutputs:
    """Named outputs of one evaluation (a pytree, so it can leave `jax.grad` as auxiliary data). `loss` is the
    weighted sum of every loss term; `metrics` holds the mean of the values of each output name; `bias_loads` and
    `bias_rates` give, per router-bias parameter, the expert load and rate of its update rule."""

    loss: jax.Array
    metrics: dict[str, jax.Array]
    bias_loads: dict[str, jax.Array]
    bias_rates: tuple[tuple[str, float], ...]


def run_model(
    module: ModuleOp,
    params: dict[str, jax.Array],
    tokens: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    explicit: bool = False,
) -> ModelOutputs:
    """Traces the model on `tokens` [B, S+1] (inputs and shifted labels in one array), on `mesh` if given."""
    func = model_func(module)
    ctx = LoweringContext.for_module(module, params, mesh=mesh, explicit=explicit)
    ctx.env[func.body.block.args[0]] = tokens
    lower_block(func.body.block, ctx)
    grouped: dict[str, list[jax.Array]] = {}
    loss = jnp.zeros((), jnp.float32)
    for name, value, weight in ctx.outputs:
        grouped.setdefault(name, []).append(value)
        if weight is not None:
            loss = loss + weight * value
    metrics = {name: sum(values[1:], values[0]) / len(values) for name, values in grouped.items()}
    loads = {name: load for name, load, _ in ctx.bias_updates}
    rates = tuple((name, rate) for name, _, rate in ctx.bias_updates)
    return ModelOutputs(loss, metrics, loads, rates)
