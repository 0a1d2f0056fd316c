"""Checks of command-line options that run before anything is compiled: a run that cannot finish (a checkpoint path
that names a file, a data file that is not token ids, a mesh that does not cover `--devices`) is refused in
milliseconds instead of after a compile of up to a minute, or after training, when its state would be lost."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from .frontend.errors import UserError

MAX_SEED = 2**32 - 1
"""Seeds feed `jax.random.key` and NumPy generators; both take 32-bit (or wider) unsigned values."""


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high]; the message names the bound ("must be at least 1")."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return convert


def finite_at_least(low: float) -> Callable[[str], float]:
    """An argparse `type` for a finite number >= low."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number of at least {low:g}, got {text}")
        return value

    return convert


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """`fsdp=4,tensor=2` as {"fsdp": 4, "tensor": 2}; digits are ASCII only (`isdigit` also accepts '²')."""
    if not text:
        return None
    mesh: dict[str, int] = {}
    for item in text.split(","):
        name, _, size = (part.strip() for part in item.partition("="))
        if not name or not (size.isascii() and size.isdigit()) or int(size) < 1:
            raise UserError(f"--mesh: expected AXIS=N[,AXIS=N...] with N >= 1, got '{item}'")
        if name in mesh:
            raise UserError(f"--mesh: axis '{name}' is given twice")
        mesh[name] = int(size)
    return mesh


def check_devices(devices: int | None, mesh: dict[str, int] | None, processes: int = 1) -> None:
    """`--devices N` (per process) with a mesh of another size would run on fewer devices than asked, or fail after
    compiling. Across `processes` processes the mesh spans every process's devices."""
    if devices and mesh and math.prod(mesh.values()) != devices * processes:
        across = f" x {processes} processes" if processes > 1 else ""
        raise UserError(
            f"--mesh {','.join(f'{k}={v}' for k, v in mesh.items())} has {math.prod(mesh.values())} devices, "
            f"but --devices asks for {devices}{across}: make them agree"
        )


def check_input(path: str, option: str = "INPUT") -> None:
    """The file to compile exists and is a file (its contents are checked by the front ends)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{option}: no such file: {path}")
    if p.is_dir():
        raise UserError(f"{option}: {path} is a directory, not a file")


def check_read_dir(path: str | None, option: str) -> None:
    """A directory dsv3c reads (a checkpoint, a HuggingFace model): it must exist and be a directory."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{option}: no such directory: {path}")
    if not p.is_dir():
        raise UserError(f"{option}: {path} is a file, not a directory")


def check_write_dir(path: str | None, option: str) -> None:
    """A directory dsv3c will create or write into: not a file, and creatable and writable where it does not yet
    exist."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option}: {path} is a file, not a directory")
    _check_writable_parent(p, option)


def check_output_file(path: str | None, option: str) -> None:
    """A file dsv3c will write: not a directory, and its directory creatable and writable."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option}: {path} is a directory, not a file")
    _check_writable_parent(p.parent, option)


def _check_writable_parent(p: Path, option: str) -> None:
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option}: cannot create {p}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option}: cannot write under {existing} (permission denied)")
