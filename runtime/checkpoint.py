"""Checkpoints of the training state as safetensors, written so that an interrupted save loses nothing.

A checkpoint is a directory `step_NNNNNNNN/` holding `state.safetensors` and `meta.json`. It is written under a
temporary name and renamed into place only when complete; `latest` is then replaced atomically. A crash at any
moment leaves either the previous checkpoint or the new one, never a half-written one that would be loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from ..frontend.errors import UserError

_VIEWS = {np.dtype(ml_dtypes.bfloat16): np.uint16}


def _flatten(state: Any) -> dict[str, np.ndarray]:
    """Host copies of every leaf; arrays spread over several processes are gathered first."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): _to_host(leaf) for path, leaf in leaves}


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, state: Any, step: int, meta: dict[str, Any] | None = None, keep: int = 3):
    """Writes the state for `step` atomically, points `latest` at it, and keeps the newest `keep` checkpoints."""
    flat = _flatten(state)  # every process takes part in gathering; only the first writes
    if jax.process_index() != 0:
        return None
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays, dtypes = {}, {}
    for key, value in flat.items():
        if value.dtype in _VIEWS:
            dtypes[key] = str(value.dtype)
            value = value.view(_VIEWS[value.dtype])
        arrays[key] = np.ascontiguousarray(value)
    save_file(arrays, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "dtypes": dtypes, **(meta or {})}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name)
    latest_tmp.replace(root / "latest")
    _fsync_dir(root)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.safetensors").exists() else None


def latest_meta(directory: str | Path) -> dict[str, Any] | None:
    """The metadata of the latest checkpoint in `directory` (its step, the run's `total_steps`), or None; read
    before compiling a resumed run, whose learning-rate schedule must be the one the run began with."""
    found = latest_checkpoint(directory)
    if found is None:
        return None
    try:
        return json.loads((found / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {found}: unreadable meta.json ({err})") from None


def restore_checkpoint(path: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint into the structure of `template` (the state a fresh run would start from)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    arrays = load_file(str(path / "state.safetensors"))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for key_path, leaf in leaves:
        key = jax.tree_util.keystr(key_path)
        if key not in arrays:
            raise UserError(f"checkpoint {path} lacks '{key}': it was written for a different model or optimizer")
        value = arrays[key]
        if key in meta["dtypes"]:
            value = value.view(np.dtype(meta["dtypes"][key]))
        if leaf.shape == () and value.shape == (1,):  # safetensors stores scalars as one-element vectors
            value = value.reshape(())
        if value.shape != leaf.shape:
            raise UserError(f"checkpoint {path}: '{key}' has shape {value.shape}, the model expects {leaf.shape}")
        restored.append(jax.numpy.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, restored), meta
