"""A matmul whose weight gradient multiplies row-major operands: the `packed` kernel of `dsv3.matmul` and of the
output head in `dsv3.head_loss`, for XLA:CPU.

The weight gradient of y = x . W is dW = x^T . dy, a product that contracts the token dimension, which is the major
(slow) one of both operands. XLA folds the transpose into the GEMM call, and XLA:CPU's GEMM (YNNPACK) runs a
transposed left operand much slower than a row-major one: measured on one core of a 2-core AMD EPYC, float32,
[tokens, width] operands, 34-55 GFLOP/s transposed against 58-78 GFLOP/s for the same product after an explicit
transposed copy of x (1.2-2.3x; the head's [512 x 1024] . [1024 x 8192] the most), while the copy is one pass over
x, far smaller than the GEMM. Where XLA did materialise a transposed operand itself, it wrote the cotangent dy
transposed, the larger of the two for an up-projection, in a copy fusion that on the 34M-parameter peer model cost
46 ms of a 2 s train step for one [1024, 1536] gradient.

So the derivative is a custom VJP that packs x^T into its own array behind an optimization barrier (without it
XLA folds the transpose back into the GEMM) and multiplies it by dy as it is. The input gradient dy . W^T reads W
transposed, which the GEMM runs at full speed (a weight's transposed operand is its own row-major array). Values and
gradients are those of `jnp.matmul` (tests/test_packed_matmul.py); what changes is only which copies XLA makes.
Other platforms' compilers choose operand layouts themselves (TPU, GPU), so only the CPU target asks for this.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def packed_transpose(x: jax.Array) -> jax.Array:
    """x [..., K] as a row-major [K, prod(...)] array of its own: the left operand of a weight gradient.

    The transpose goes through a 3-D view ([2, T/2, K] -> [K, 2, T/2]). A plain 2-D transpose of a bf16 operand is one
    XLA:CPU folds into the product, which it then runs with both operands widened to f32, at f32 speed; through the
    3-D view XLA copies the bf16 values and YNNPACK's bf16 GEMM runs: [512 x 1024] . [1024 x 1536] in 7.9 against
    15.8 ms on one core of this host (f32: 15.4 against 15.7, unchanged)."""
    rows = x.reshape(-1, x.shape[-1])
    tokens, width = rows.shape
    split = 2 if tokens % 2 == 0 else 1
    view = jnp.transpose(rows.reshape(split, tokens // split, width), (2, 0, 1))
    return lax.optimization_barrier(view.reshape(width, tokens))


def _product(a: jax.Array, b: jax.Array, accumulate: jnp.dtype) -> jax.Array:
    """a . b in `accumulate`, summed in at least float32: with bf16 operands XLA:CPU's GEMM (YNNPACK) then runs its
    bf16 x bf16 -> f32 kernel, about twice its f32 speed on a CPU with AVX512-BF16, where a bf16 result runs at f32
    speed (`benchmarks/RESULTS.md`), and the sum is the more accurate one.

    A narrower-than-f32 product's result passes an optimization barrier: a consumer that reads it transposed would
    otherwise have XLA lay the product out transposed, which YNNPACK declines, and XLA:CPU's fallback (DotThunk) has
    no bf16 x bf16 -> f32 kernel (`UNIMPLEMENTED`; `tests/test_packed_matmul.py`)."""
    wide = jnp.promote_types(accumulate, jnp.float32)
    out = jnp.matmul(a, b, preferred_element_type=wide)
    if a.dtype != wide or b.dtype != wide:
        out = lax.optimization_barrier(out)
    return out.astype(accumulate)


def weight_grad(x: jax.Array, d_y: jax.Array, accumulate: jnp.dtype) -> jax.Array:
    """x^T . d_y over every leading dimension: [K, N] for x [..., K] and d_y [..., N], from row-major operands."""
    return _product(packed_transpose(x), d_y.reshape(-1, d_y.shape[-1]).astype(x.dtype), accumulate)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def packed_matmul(x: jax.Array, w: jax.Array, accumulate: jnp.dtype) -> jax.Array:
    """`jnp.matmul(x, w, preferred_element_type=accumulate)` for x [..., K] and w [K, N], with the weight gradient
    computed from a packed x^T."""
    return _product(x, w, accumulate)


def _forward(x: jax.Array, w: jax.Array, accumulate: jnp.dtype) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return packed_matmul(x, w, accumulate), (x, w)


def _backward(accumulate: jnp.dtype, residuals: tuple[jax.Array, jax.Array], d_y: jax.Array):
    x, w = residuals
    d_x = _product(d_y, w.T.astype(d_y.dtype), accumulate).astype(x.dtype)
    return d_x, weight_grad(x, d_y, accumulate).astype(w.dtype)


packed_matmul.defvjp(_forward, _backward)
