"""AdamW and its learning-rate schedule, built from the module's `dsv3.optimizer` declaration."""

from __future__ import annotations

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


def make_optimizer(module: ModuleOp, infos: dict[str, ParamInfo], total_steps: int) -> optax.GradientTransformation:
    op = optimizer_op(module)
    mask = {name: _decays(info) for name, info in infos.items() if info.trainable}
    moments = jnp.bfloat16 if op.moments.data == "bf16" else jnp.float32
    adamw = optax.adamw(
        schedule(op, total_steps), b1=op.float_prop("b1"), b2=op.float_prop("b2"), eps=op.float_prop("eps"),
        weight_decay=op.float_prop("weight_decay"), mask=mask, mu_dtype=moments,
    )
    clip = op.float_prop("clip")
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
