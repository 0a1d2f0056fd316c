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


@partial(
    jax.tree_util.register_dataclass, data_fields=["loss", "metrics", "bias_loads"], meta_fields=["bias_rates", "roles"]
)
@dataclass
class ModelOutputs:
    """Named outputs of one evaluation (a pytree, so it can leave `jax.grad` as auxiliary data). `loss` is the
    weighted sum of every loss term; `metrics` holds the mean of the values of each output name; `bias_loads` and
    `bias_rates` give, per router-bias parameter, the expert load and rate of its update rule; `roles` the role of
    each output name, so that callers find the logits by role, not by what the IR calls them."""

    loss: jax.Array
    metrics: dict[str, jax.Array]
    bias_loads: dict[str, jax.Array]
    bias_rates: tuple[tuple[str, float], ...]
    roles: tuple[tuple[str, dsv3.OutputRole], ...]

    def names(self, *roles: dsv3.OutputRole) -> set[str]:
        """The output names with one of `roles`."""
        return {name for name, role in self.roles if role in roles}

    def of_role(self, role: dsv3.OutputRole) -> jax.Array:
        """The one output of a role a function has at most one of (`dsv3.UNIQUE_ROLES`), such as the logits."""
        assert role in dsv3.UNIQUE_ROLES, role
        (name,) = self.names(role) or (None,)
        if name is None:
            raise UserError(f"the model has no {role} output")
        return self.metrics[name]


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
    roles: dict[str, dsv3.OutputRole] = {}
    loss = jnp.zeros((), jnp.float32)
    for out in ctx.outputs:
        grouped.setdefault(out.name, []).append(out.value)
        if roles.setdefault(out.name, out.role) != out.role:
            raise UserError(f"outputs named '{out.name}' have two roles, {roles[out.name]} and {out.role}")
        if out.role in dsv3.LOSS_ROLES:
            assert out.weight is not None  # the op's verifier requires it
            loss = loss + out.weight * out.value
    metrics = {name: sum(values[1:], values[0]) / len(values) for name, values in grouped.items()}
    loads = {name: load for name, load, _ in ctx.bias_updates}
    rates = tuple((name, rate) for name, _, rate in ctx.bias_updates)
    return ModelOutputs(loss, metrics, loads, rates, tuple(roles.items()))
