"""A module's `dsv3.parallel` declaration (a spec's `parallel` block) as the defaults of a compile.

The declaration names a mesh, a sharding mode, a recompute policy and the head-loss form. `dsv3c.compile` takes each
wherever its caller gives none (an explicit mesh, shard mode or `-p` pipeline still wins), so that a spec written by
`dsv3c plan --write-spec`, or an IR dump of one, compiles to the planned layout with no options. The compile reads the
layout off the IR, never off the spec: the IR stays the single source of truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from .dialects.sharding import ParallelOp
from .frontend.errors import UserError
from .frontend.spec import ParallelSpec
from .passes.fuse_head_loss import FuseHeadLossPass
from .passes.remat import RematPass
from .targets import Target, resolve_target

Locator = Callable[[Exception], Exception]


def layout_op(module: ModuleOp) -> ParallelOp | None:
    """The module's `dsv3.parallel` (at most one: `dialects/checks.py`)."""
    return next((op for op in module.ops if isinstance(op, ParallelOp)), None)


def set_layout(module: ModuleOp, layout: ParallelSpec) -> None:
    """Declares `layout` in `module`, replacing any layout it had (what `dsv3c plan` compiles each candidate with)."""
    old = layout_op(module)
    op = ParallelOp(layout.mesh, layout.shard_mode, layout.remat, layout.head_loss, layout.target)
    if old is not None:
        Rewriter.replace_op(old, op)
    else:
        Rewriter.insert_op(op, InsertPoint.at_start(module.body.block))


def mesh_text(mesh: dict[str, int]) -> str:
    """`fsdp=2,tensor=2`, as `--mesh` takes it."""
    return ",".join(f"{axis}={size}" for axis, size in mesh.items())


def applicable_layout(
    module: ModuleOp, target: Target, devices: int | None, locate: Locator, say: Callable[[str], None]
) -> ParallelOp | None:
    """The module's layout if it applies to a compile for `target`: a layout for another target is left aside (with
    a note), a misnamed target or a mesh of the wrong size is an error at the declaration (the spec's block, or the
    op in an IR file)."""
    op = layout_op(module)
    if op is None:
        return None
    if op.target_name is not None:
        try:
            planned = resolve_target(op.target_name).name
        except UserError as err:
            raise locate(_at(op, "model.parallel.target", f"the parallel layout's target: {err}")) from None
        if planned != target.name:
            say(f"note: the parallel layout is for {planned}; compiling for {target.name} without it")
            return None
    size = math.prod(op.sizes.values())
    chips = target.chips or devices
    if chips and size != chips:
        what = f"target '{target.name}' has {chips} chips" if target.chips else f"--devices asks for {chips}"
        raise locate(_at(
            op, "model.parallel.mesh",
            f"the parallel layout's mesh {mesh_text(op.sizes)} has {size} devices, but {what}: give --mesh, or "
            "plan again for this target",
        ))
    return op


def layout_passes(op: ParallelOp, defaults: Sequence[ModulePass]) -> list[ModulePass]:
    """A training pipeline: the passes the layout names (fused head loss, its recompute policy), then the target's
    default passes it does not replace (an unfused head loss replaces a target's fused one). `keep=true` on the
    recompute pass, as in the targets' defaults: an IR file whose layers already carry hand-edited tags keeps them."""
    chosen: list[ModulePass] = []
    if op.head_loss.data == "fused":
        chosen.append(FuseHeadLossPass())
    if op.remat_policy is not None:
        chosen.append(RematPass(policy=op.remat_policy, keep=True))
    replaced = {p.name for p in chosen} | {FuseHeadLossPass.name}
    return chosen + [p for p in defaults if p.name not in replaced]


def _at(op: ParallelOp, field: str, message: str) -> UserError:
    """An error a locator can place: at `field` of a spec, or at `op` in an IR file."""
    error = UserError(message)
    error.op = op
    error.field = field
    return error
