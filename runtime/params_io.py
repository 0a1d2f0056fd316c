"""Parameters on disk for inference: `params.safetensors` (what `dsv3c import-hf --params` writes) or the parameters
(or their EMA) inside an Orbax training checkpoint (`runtime/checkpoint.py`), read by IR parameter name.

safetensors has no bfloat16 in NumPy, so bf16 arrays are stored as their uint16 bits with the true dtype in
`meta.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from ..frontend.errors import UserError
from .checkpoint import is_training_checkpoint, load_checkpoint_params
from .model import ParamInfo

PARAMS_FILE = "params.safetensors"
_BITS = {np.dtype(ml_dtypes.bfloat16): np.uint16}


def save_params(directory: str | Path, params: dict[str, np.ndarray]) -> Path:
    """Writes `directory/params.safetensors` and `meta.json` atomically (temporary names, then renames)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays, dtypes = {}, {}
    for name, value in params.items():
        value = np.asarray(value)
        if value.dtype in _BITS:
            dtypes[name] = str(value.dtype)
            value = value.view(_BITS[value.dtype])
        arrays[name] = np.ascontiguousarray(value)
    tmp = out / f".{PARAMS_FILE}.tmp"
    save_file(arrays, str(tmp))
    meta_tmp = out / ".meta.json.tmp"
    meta_tmp.write_text(json.dumps({"dtypes": dtypes}, indent=1))
    for path in (tmp, meta_tmp):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    tmp.replace(out / PARAMS_FILE)
    meta_tmp.replace(out / "meta.json")
    return out / PARAMS_FILE


def load_params(directory: str | Path, infos: dict[str, ParamInfo], ema: bool = False) -> dict[str, np.ndarray]:
    """Every parameter `infos` declares, from `directory` (a `params.safetensors` folder or a training checkpoint;
    `ema` takes a checkpoint's moving average); a missing or misshapen one is an error naming it."""
    directory = Path(directory)
    if is_training_checkpoint(directory):
        return _checked(directory, load_checkpoint_params(directory, ema), infos)
    if ema:
        raise UserError(f"--ema: {directory} is not a training checkpoint (only those hold an EMA)")
    return _checked(directory / PARAMS_FILE, read_params_file(directory), infos)


def read_params_file(directory: str | Path) -> dict[str, np.ndarray]:
    """The arrays of `directory/params.safetensors` by name, in their dtypes (bf16 is stored as its bits)."""
    path = Path(directory) / PARAMS_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {PARAMS_FILE} or training checkpoint found")
    arrays = load_file(str(path))
    meta_path = path.parent / "meta.json"
    dtypes = json.loads(meta_path.read_text()).get("dtypes", {}) if meta_path.is_file() else {}
    for key in set(dtypes) & set(arrays):
        arrays[key] = arrays[key].view(np.dtype(dtypes[key]))
    return arrays


def _checked(path: Path, arrays: dict[str, np.ndarray], infos: dict[str, ParamInfo]) -> dict[str, np.ndarray]:
    params = {}
    for name, info in infos.items():
        if name not in arrays:
            raise UserError(f"{path}: parameter '{name}' is missing (written for a different model?)")
        value = arrays[name]
        if value.shape != info.shape:
            got, want = list(value.shape), list(info.shape)
            raise UserError(f"{path}: parameter '{name}' has shape {got}, the model has {want}")
        params[name] = value.astype(info.dtype)
    return params
