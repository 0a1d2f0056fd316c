"""Compilation targets: what each chip offers (HBM, peak FLOP/s, FP8), how many a target name means, and where its
JAX devices come from: the local backend, or a TPU/GPU topology description that lets XLA compile for hardware this
machine does not have (ahead of time, from shapes alone)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from .frontend.errors import UserError

GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    """One accelerator chip (or the host, for `cpu`). Peak FLOP/s are dense bf16; bandwidths in bytes/s."""

    kind: str
    platform: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    interconnect_bandwidth: float
    has_fp8: bool


CHIPS = {
    "cpu": Chip("cpu", "cpu", 0, 0.0, 0.0, 0.0, False),
    "h100": Chip("h100", "gpu", 80 * GiB, 989e12, 3.35e12, 450e9, True),
    "h200": Chip("h200", "gpu", 141 * GiB, 989e12, 4.8e12, 450e9, True),
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, 2.765e12, 600e9, False),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, 0.819e12, 200e9, False),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12, 1.64e12, 400e9, False),
}

# Device descriptions for ahead-of-time GPU compiles (a GpuTargetConfig text proto): published hardware figures.
_GPU_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{name}"
"""
_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


@dataclass(frozen=True)
class Target:
    """A named target of `chips` devices of one kind. `local` targets run here; the others compile ahead of time.
    `chips` is 0 when the count is free (cpu, gpu: given by the mesh or --devices)."""

    name: str
    chip: Chip
    chips: int
    local: bool

    def device_count(self, requested: int | None) -> int:
        if self.chips and requested and requested != self.chips:
            raise UserError(f"target '{self.name}' has {self.chips} chips, but the mesh asks for {requested}")
        return self.chips or requested or 1

    def devices(self, count: int) -> list[Any]:
        """`count` JAX devices of this target, real or from a topology description."""
        import jax

        if self.name == "cpu":
            have = jax.devices("cpu")
            if len(have) < count:
                raise UserError(
                    f"the mesh needs {count} CPU devices but JAX has {len(have)}: pass --devices {count} (or set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts)"
                )
            return have[:count]
        if self.name == "gpu":
            try:
                have = jax.devices("gpu")
            except RuntimeError:
                raise UserError("target 'gpu' needs a local GPU and jax[cuda12]; none was found") from None
            if len(have) < count:
                raise UserError(f"the mesh needs {count} GPUs but this machine has {len(have)}")
            return have[:count]
        if self.chip.platform == "tpu":
            return _tpu_devices(self.chip.kind, count)
        return _gpu_devices(self.chip.kind, count)


def resolve_target(name: str) -> Target:
    """Parses a target name (`cpu`, `gpu`, `gpu-h100`, `gpu-h200`, `tpu-v5p-N`, `tpu-v5e-N`, `tpu-v6e-N`).

    Google's slice names count TensorCores: a v5p-N slice has N/2 chips, v5e-N and v6e-N have N."""
    if name == "cpu":
        return Target(name, CHIPS["cpu"], 0, True)
    if name == "gpu":
        return Target(name, CHIPS["h100"], 0, True)
    if name in ("gpu-h100", "gpu-h200"):
        return Target(name, CHIPS[name.removeprefix("gpu-")], 0, False)
    match = re.fullmatch(r"tpu-(v5p|v5e|v6e)-(\d+)", name)
    if match:
        kind, n = match.group(1), int(match.group(2))
        chips = n // 2 if kind == "v5p" else n
        smallest = 4 if kind == "v5p" else 1
        if chips < smallest or (kind == "v5p" and n % 2) or chips & (chips - 1):
            raise UserError(f"target '{name}': {n} is not a {kind} slice size (a power of two, at least {smallest})")
        return Target(name, CHIPS[kind], chips, False)
    raise UserError(
        f"unknown target '{name}' (expected cpu, gpu, gpu-h100, gpu-h200, tpu-v5p-N, tpu-v5e-N or tpu-v6e-N)"
    )


def _tpu_shape(kind: str, chips: int) -> tuple[int, ...]:
    """The chip grid of a slice: v5p slices grow as a 3-D torus from 2x2x1, v5e/v6e as 2-D grids."""
    if kind == "v5p":
        shape = [2, 2, 1]
        while math.prod(shape) < chips:
            axis = min(range(3), key=lambda a: (shape[a], -a))  # double the shortest side, z first
            shape[axis] *= 2
        return tuple(shape)
    shape = [1, 1]
    while math.prod(shape) < chips:
        shape[0 if shape[0] <= shape[1] else 1] *= 2
    return tuple(sorted(shape))


def _tpu_devices(kind: str, chips: int) -> list[Any]:
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"TPU targets need libtpu to compile ahead of time: pip install 'dsv3c[tpu]' ({kind})")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several dsv3c processes may compile at once
    from jax.experimental import topologies

    shape = _tpu_shape(kind, chips)
    host = tuple(min(s, b) for s, b in zip(shape + (1,) * (3 - len(shape)), (2, 2, 1), strict=True))
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{kind}:{'x'.join(map(str, shape))}", chip_config_name="default",
        chips_per_host_bounds=host, num_slices=1,
    )
    return list(topology.devices)


def _has_module(name: str) -> bool:
    """`find_spec` of a dotted name imports its parent package, and raises when that is missing."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _gpu_devices(kind: str, count: int) -> list[Any]:
    if not _has_module("jax_plugins.xla_cuda12"):
        raise UserError(
            f"GPU targets need the CUDA plugin to compile ahead of time: pip install 'dsv3c[gpu-aot]' ({kind})"
        )
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    chip = CHIPS[kind]
    config = _GPU_CONFIG.format(bandwidth=int(chip.hbm_bandwidth), memory=chip.hbm_bytes, name=_GPU_NAMES[kind])
    per_host = min(count, 8)
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{max(count // per_host, 1)}x{per_host}", target_config=config
    )
    return list(topology.devices)
