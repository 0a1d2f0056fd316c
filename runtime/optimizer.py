"""AdamW and its learning-rate schedule, built from the module's `dsv3.optimizer` declaration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from xdsl.dialects.builtin import ModuleOp

from ..dialects import dsv3
from ..frontend.errors import UserError
from .model import ParamInfo


def optimizer_op(module: ModuleOp) -> dsv3.OptimizerOp:
    op = dsv3.find_optimizer(module)
    if op is not None:
        return op
    raise UserError("the module declares no dsv3.optimizer (a train or forward program needs one)")


def schedule(op: dsv3.OptimizerOp, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` over `decay_steps` (or over the
    rest of the run when 0), or constant."""
    lr, warmup = op.float_prop("lr"), op.int_prop("warmup")
    end = lr * op.float_prop("min_lr_ratio")
    decay = op.int_prop("decay_steps") or max(total_steps - warmup, 1)
    kind = op.schedule.data
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, decay)
    else:
        main = optax.cosine_decay_schedule(lr, decay, alpha=end / lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decays(info: ParamInfo) -> bool:
    """Weight decay applies to matrices, not to norm scales (their axes, less `layers`, are one-dimensional)."""
    return len([a for a in info.axes if a != "layers"]) >= 2


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` as one scalar factor on every gradient (1, or max_norm / norm above it). optax
    divides each element by the norm, which XLA will not repeat in each of AdamW's fused updates (the parameter's and
    both moments'), so it writes the clipped gradients out and reads them back three times: on XLA:CPU the factor
    made the update of 34M parameters 7% faster (benchmarks/RESULTS.md)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(module: ModuleOp, infos: dict[str, ParamInfo], total_steps: int) -> optax.GradientTransformation:
    op = optimizer_op(module)
    mask = {name: _decays(info) for name, info in infos.items() if info.trainable}
    moments = jnp.bfloat16 if op.moments.data == "bf16" else jnp.float32
    adamw = optax.adamw(
        schedule(op, total_steps), b1=op.float_prop("b1"), b2=op.float_prop("b2"), eps=op.float_prop("eps"),
        weight_decay=op.float_prop("weight_decay"), mask=mask, mu_dtype=moments,
    )
    clip = op.float_prop("clip")
    return optax.chain(clip_by_global_norm(clip), adamw) if clip > 0 else adamw
