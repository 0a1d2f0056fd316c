"""Running an attention kernel per device on a mesh.

A kernel that computes one device's share of attention (a Pallas call XLA cannot partition, or a blockwise loop
whose concatenations explicit-axis sharding would have to type) runs under `shard_map`: the batch split over the
batch axes, heads over the head axis, the sequence whole on each device, and the rope key (shared by all heads)
replicated over the head axis. With explicit mesh axes the operands are first resharded to those layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec


def per_device_attention(
    kernel: Callable[..., jax.Array], args: Sequence[jax.Array], mesh: Mesh, batch_axes: tuple[str, ...],
    head_axis: str | None,
) -> jax.Array:
    """`kernel(q_nope, q_pe, k_nope, k_pe, v)` on each device's block of `args`."""
    batch = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    per_head = PartitionSpec(batch, None, head_axis, None)
    rope_key = PartitionSpec(batch, None, None)
    specs = (per_head, per_head, per_head, rope_key, per_head)
    if AxisType.Explicit in mesh.axis_types:
        args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, specs, strict=True))
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=per_head, check_vma=False)(*args)
