"""The gradient clip of the AdamW chain (`runtime/optimizer.py`): optax's `clip_by_global_norm` as one scalar factor,
checked against optax itself and NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3c.runtime.optimizer import clip_by_global_norm


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped, and left alone
def test_clip_equals_optax_and_the_formula(max_norm):
    rng = np.random.default_rng(0)
    grads = {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    ours, _ = clip_by_global_norm(max_norm).update(_as_jax(grads), optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(_as_jax(grads), optax.EmptyState())
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    factor = min(1.0, max_norm / norm)
    for name, g in grads.items():
        np.testing.assert_allclose(ours[name], g * factor, rtol=1e-6)
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6)
    assert (factor < 1.0) == (max_norm == 0.5)


def _as_jax(grads: dict[str, np.ndarray]) -> dict[str, jnp.ndarray]:
    return {name: jnp.asarray(g) for name, g in grads.items()}
