"""From the sharding decisions in the IR to JAX: the device mesh, and the shardings of parameters, optimizer state
and the token batch that the jitted functions take."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from xdsl.dialects.builtin import ModuleOp

from ..dialects import dsv3
from ..dialects.sharding import BATCH_AXES, MeshOp
from .lower.sharding import partition_spec


def mesh_op(module: ModuleOp) -> MeshOp | None:
    return next((op for op in module.ops if isinstance(op, MeshOp)), None)


def mesh_size(module: ModuleOp) -> int:
    return math.prod(mesh_sizes(module).values())


def mesh_sizes(module: ModuleOp) -> dict[str, int]:
    """Each mesh axis's size, as the IR declares it (empty without a mesh)."""
    op = mesh_op(module)
    return dict(op.sizes) if op else {}


def build_mesh(module: ModuleOp, devices: Sequence[Any]) -> Mesh | None:
    """The JAX mesh the IR declares, over `devices` (None when the IR has no mesh or it has one device)."""
    op = mesh_op(module)
    if op is None or mesh_size(module) == 1:
        return None
    sizes = op.sizes
    kind = AxisType.Explicit if op.mode.data == "explicit" else AxisType.Auto
    grid = np.array(devices[: math.prod(sizes.values())], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes), axis_types=(kind,) * len(sizes))


def is_explicit(module: ModuleOp) -> bool:
    op = mesh_op(module)
    return op is not None and op.mode.data == "explicit"


def param_shardings(module: ModuleOp, mesh: Mesh) -> dict[str, NamedSharding]:
    """Each parameter's sharding as the shard pass wrote it (replicated where it wrote none)."""
    shardings = {}
    for op in dsv3.walk_params(module):
        spec = partition_spec(op.sharding) if op.sharding is not None else PartitionSpec()
        shardings[op.pname] = NamedSharding(mesh, spec)
    return shardings


def state_shardings(abstract_state: Any, params: dict[str, NamedSharding], mesh: Mesh) -> Any:
    """Shardings of a training state: optimizer moments follow their parameter (they sit under its name in the
    optax state), counters and scalars are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def choose(path, leaf) -> NamedSharding:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = keys[-1] if keys else None
        return params[name] if name in params and len(leaf.shape) else replicated

    return jax.tree_util.tree_map_with_path(choose, abstract_state)


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Tokens [B, S+1] split over every batch axis the mesh has; B must divide."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    if batch % ways:
        from ..frontend.errors import UserError

        raise UserError(f"batch {batch} does not divide over the batch mesh axes {'x'.join(axes)} = {ways} devices")
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None)))
