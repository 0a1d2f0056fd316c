"""FP8 weight storage: filling the parameters of a weight-only FP8 program (`dsv3-fp8-quant{weights_only=true}`).

Such a program declares each stored weight with an FP8 dtype and a `<name>.scale` parameter of block scales. Two
sources fill them:
- released FP8 checkpoints (DeepSeek-V3's): `from_hf_block_fp8` puts an HF weight [out, in] in FP8 with its
  `weight_scale_inv` [ceil(out/128), ceil(in/128)] into dsv3's [in, out] layout as it is: values and scales are
  transposed, never re-quantised, so the program computes with exactly the checkpoint's numbers;
- full-precision parameters (a training checkpoint, an initialisation): `store_fp8` quantises each weight per
  block the way the program's `dsv3.dequantize` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from .fp8 import Tiling, quantize
from .model import ParamInfo

SCALE_SUFFIX = ".scale"


def from_hf_block_fp8(weight: np.ndarray, scale_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values [in, out], scales [ceil(in/b), ceil(out/b)]) from an HF Linear weight [out, in] and its
    `weight_scale_inv` [ceil(out/b), ceil(in/b)] (a multiplier, despite the name): w[i, j] = values * scale of
    the block holding (i, j), before and after."""
    return np.ascontiguousarray(weight.T), np.ascontiguousarray(np.asarray(scale_inv, np.float32).T)


def stored_weights(infos: Mapping[str, ParamInfo]) -> dict[str, str]:
    """FP8-stored weight name -> its scale parameter's name."""
    scaled = {name for name in infos if name + SCALE_SUFFIX in infos}
    return {name: name + SCALE_SUFFIX for name in scaled if _is_fp8(infos[name].dtype)}


def _is_fp8(dtype) -> bool:
    return np.dtype(dtype).name.startswith("float8")


def store_fp8(params: Mapping[str, jax.Array], infos: Mapping[str, ParamInfo], block: int) -> dict[str, jax.Array]:
    """`params` with every FP8-stored weight quantised per `block x block` tile of each of its matrices (the last
    two axes; layers and experts before them), its scales added. Other parameters pass through."""
    out = dict(params)
    for name, scale_name in stored_weights(infos).items():
        info = infos[name]
        fmt = "e4m3" if "e4m3" in np.dtype(info.dtype).name else "e5m2"
        tiling = Tiling(fmt, block, block)
        full = params[name]
        matrices = full.reshape(-1, *full.shape[-2:])
        values, scales = jax.vmap(lambda m, t=tiling: quantize(m, t))(matrices)
        out[name] = values.reshape(full.shape)
        out[scale_name] = scales.reshape(infos[scale_name].shape)
    return out
