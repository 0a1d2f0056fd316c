"""Mapping from IR element types to JAX dtypes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from xdsl.dialects.builtin import (
    BFloat16Type,
    Float8E4M3FNType,
    Float8E5M2Type,
    Float16Type,
    Float32Type,
    IntegerType,
    TensorType,
)
from xdsl.ir import Attribute, SSAValue


def jax_dtype(element_type: Attribute) -> np.dtype:
    """The JAX dtype of an IR element type."""
    if isinstance(element_type, Float32Type):
        return jnp.dtype(jnp.float32)
    if isinstance(element_type, BFloat16Type):
        return jnp.dtype(jnp.bfloat16)
    if isinstance(element_type, Float16Type):
        return jnp.dtype(jnp.float16)
    if isinstance(element_type, Float8E4M3FNType):
        return jnp.dtype(jnp.float8_e4m3fn)
    if isinstance(element_type, Float8E5M2Type):
        return jnp.dtype(jnp.float8_e5m2)
    if isinstance(element_type, IntegerType):
        return jnp.dtype(f"int{element_type.width.data}")
    raise TypeError(f"no JAX dtype for {element_type}")


def result_dtype(value: SSAValue) -> np.dtype:
    """The JAX dtype of a tensor-typed SSA value."""
    assert isinstance(value.type, TensorType)
    return jax_dtype(value.type.element_type)
