"""Parameter initialisation from what the IR declares (`init`, `std`, dtype), one PRNG stream per parameter."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from .model import ParamInfo


def init_param(key: jax.Array, info: ParamInfo) -> jax.Array:
    if info.init == "zeros":
        return jnp.zeros(info.shape, info.dtype)
    if info.init == "ones":
        return jnp.ones(info.shape, info.dtype)
    return (info.std * jax.random.normal(key, info.shape, jnp.float32)).astype(info.dtype)


def init_params(infos: dict[str, ParamInfo], seed: int | jax.Array) -> dict[str, jax.Array]:
    """Every parameter's key is folded from the seed and a hash of its name, so adding or removing one parameter
    (say the MTP module) leaves the others' initial values unchanged."""
    root = jax.random.key(seed)
    return {
        name: init_param(jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF), info)
        for name, info in infos.items()
    }
