"""Dynamic slices that keep 16-bit floats 16-bit on XLA:CPU, for the CPU kernels' loops.

XLA:CPU computes a bf16 dynamic slice in float32 (its float normalisation widens the operand and narrows the
result), and when the sliced operand does not change inside the loop, XLA hoists the widening out of it: every window
of the tiled experts and every tile of the blockwise attention was sliced from a float32 copy of the whole operand
(the layer's expert stack, the padded rows, the blocked queries and keys), written once per call at twice the bytes
and read back narrowed. Slicing the operand's 16-bit integer view moves the same bits with no conversion
(`tests/test_grouped_gemm_cpu.py` checks the compiled program converts none of them). Other dtypes slice as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _is_narrow_float(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2


def dynamic_slice(x: jax.Array, start: jax.Array, size: int, axis: int = 0) -> jax.Array:
    """`lax.dynamic_slice_in_dim(x, start, size, axis)`, through the 16-bit integer view for a 16-bit float x."""
    if not _is_narrow_float(x):
        return lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    bits = lax.dynamic_slice_in_dim(lax.bitcast_convert_type(x, jnp.uint16), start, size, axis=axis)
    return lax.bitcast_convert_type(bits, x.dtype)


def dynamic_index(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] along the leading axis, as `dynamic_slice` slices."""
    return dynamic_slice(x, index, 1)[0]
