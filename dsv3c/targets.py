"""Compilation targets: what each chip offers (HBM, peak FLOP/s, FP8) and how many a target name means."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .frontend.errors import UserError

GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    """One accelerator chip (or the host, for `cpu`). Peak FLOP/s are dense bf16."""

    kind: str
    platform: str
    hbm_bytes: int
    peak_bf16_flops: float
    has_fp8: bool


CHIPS = {
    "cpu": Chip("cpu", "cpu", 0, 0.0, False),
    "h100": Chip("h100", "gpu", 80 * GiB, 989e12, True),
    "h200": Chip("h200", "gpu", 141 * GiB, 989e12, True),
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, False),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, False),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12, False),
}


@dataclass(frozen=True)
class Target:
    """A named target: `chips` devices of one kind. `local` targets run here; others compile ahead of time."""

    name: str
    chip: Chip
    chips: int
    local: bool


def resolve_target(name: str) -> Target:
    """Parses a target name (`cpu`, `gpu`, `gpu-h100`, `gpu-h200`, `tpu-v5p-N`, `tpu-v5e-N`, `tpu-v6e-N`).

    Google's slice names count TensorCores: a v5p-N slice has N/2 chips, v5e-N and v6e-N have N."""
    if name == "cpu":
        return Target(name, CHIPS["cpu"], 1, True)
    if name == "gpu":
        return Target(name, CHIPS["h100"], 1, True)
    if name in ("gpu-h100", "gpu-h200"):
        return Target(name, CHIPS[name.removeprefix("gpu-")], 1, False)
    match = re.fullmatch(r"tpu-(v5p|v5e|v6e)-(\d+)", name)
    if match:
        kind, n = match.group(1), int(match.group(2))
        chips = n // 2 if kind == "v5p" else n
        if chips < 1 or (kind == "v5p" and n % 2):
            raise UserError(f"target '{name}': a {kind} slice of {n} cores is not a valid slice size")
        return Target(name, CHIPS[kind], chips, False)
    raise UserError(
        f"unknown target '{name}' (expected cpu, gpu, gpu-h100, gpu-h200, tpu-v5p-N, tpu-v5e-N or tpu-v6e-N)"
    )
