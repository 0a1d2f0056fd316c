"""The training step: forward, weighted losses, backward, AdamW, and the router-bias update outside the gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from xdsl.dialects.builtin import ModuleOp

from ..dialects.dsv3 import OutputRole
from .model import ModelOutputs, ParamInfo, run_model
from .pipelined import make_pipelined_value_and_grad
from .stages import stage_layout

TrainState = dict[str, Any]


def split_params(infos: dict[str, ParamInfo], params: dict[str, jax.Array]) -> TrainState:
    """Trainable parameters go to the optimizer; the rest (router correction biases) are updated by rule."""
    return {
        "params": {k: v for k, v in params.items() if infos[k].trainable},
        "router_bias": {k: v for k, v in params.items() if not infos[k].trainable},
    }


def apply_bias_updates(biases: dict[str, jax.Array], out: ModelOutputs) -> dict[str, jax.Array]:
    """b += rate * sign(mean(load) - load), per layer: under-loaded experts become more attractive."""
    biases = dict(biases)
    for name, rate in out.bias_rates:
        load = out.bias_loads[name]
        mean = jnp.mean(load, axis=-1, keepdims=True)
        biases[name] = (biases[name] + rate * jnp.sign(mean - load)).astype(biases[name].dtype)
    return biases


def _value_and_grad(module: ModuleOp, mesh: jax.sharding.Mesh | None, explicit: bool):
    """(state, tokens) -> ((loss, ModelOutputs), gradients w.r.t. the trainable parameters, in their dtypes).

    A gradient held in the compute dtype (`runtime/lower/weights.py`) is widened here, where XLA fuses the
    conversion into its readers (the norm, the update) instead of materialising a wide copy. A pipelined module
    (`dsv3-pipeline`) runs its schedule instead (`runtime/pipelined.py`), on a state in the stage layout."""
    layout = stage_layout(module)
    if layout is not None:
        return make_pipelined_value_and_grad(module, layout, mesh, explicit)

    def loss_fn(trainable, fixed, tokens):
        out = run_model(module, {**trainable, **fixed}, tokens, mesh, explicit)
        return out.loss, out

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def value_and_grad(state, tokens):
        value, grads = grad_fn(state["params"], state["router_bias"], tokens)
        return value, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])

    return value_and_grad


def make_loss_and_grads(module: ModuleOp, mesh: jax.sharding.Mesh | None = None, explicit: bool = False):
    """state, tokens -> (metrics, gradients of the weighted loss w.r.t. the trainable parameters)."""
    value_and_grad = _value_and_grad(module, mesh, explicit)

    def loss_and_grads(state: TrainState, tokens: jax.Array):
        (loss, out), grads = value_and_grad(state, tokens)
        return {**out.metrics, "loss": loss}, grads

    return loss_and_grads


def make_eval_step(module: ModuleOp, mesh: jax.sharding.Mesh | None = None, explicit: bool = False):
    """state, tokens -> the scalar losses of the model on `tokens`, without gradients (held-out evaluation)."""

    layout = stage_layout(module)

    def eval_step(state: TrainState, tokens: jax.Array) -> dict[str, jax.Array]:
        params = {**state["params"], **state["router_bias"]}
        if layout is not None:  # evaluated unpipelined, on the IR's layout
            params = layout.unstage_params(params)
        out = run_model(module, params, tokens, mesh, explicit)
        return {k: v for k, v in out.metrics.items() if v.ndim == 0} | {"loss": out.loss}

    return eval_step


def make_train_step(
    module: ModuleOp,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh | None = None,
    explicit: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure step function (to be jitted): state, {"tokens": int32[B, S+1]} -> new state, metrics."""
    value_and_grad = _value_and_grad(module, mesh, explicit)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        (loss, out), grads = value_and_grad(state, batch["tokens"])
        with jax.named_scope("optimizer"):  # the report's memory_breakdown finds the update's buffers by this name
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            updated = {
                "params": optax.apply_updates(state["params"], updates),
                "router_bias": apply_bias_updates(state["router_bias"], out),
                "opt_state": opt_state,
                "step": state["step"] + 1,
            }
            # A NaN/inf loss or gradient would poison every weight and both Adam moments for good: such a step keeps
            # the state as it was (step counter included) and says so; the loop counts these and stops after too many.
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        # The logits and hidden state are arrays per token, not numbers to log.
        per_token = out.names(OutputRole.LOGITS, OutputRole.HIDDEN)
        metrics = {k: v for k, v in out.metrics.items() if k not in per_token}
        for name in ("lm_loss", "mtp_loss", "balance_loss"):
            metrics.setdefault(name, jnp.zeros((), jnp.float32))
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
        return new_state, metrics

    return step
