"""`import dsv3c` tunes glibc's allocator so that XLA:CPU's per-execution temporaries are reused, not mapped and
faulted in anew: counted in minor page faults per call of a jitted program, against the pages of its temporaries
(XLA's own memory analysis), in a fresh process each (the settings must come before JAX starts)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from dsv3c.runtime.host_memory import OPT_OUT

PROGRAM = """
import json, resource
import dsv3c
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 2048 * 2048, dtype=jnp.float32).reshape(2048, 2048)
# like a train step: the state is donated and comes back, its temporaries (64 MiB) are freed after each call
step = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x) * 1e-3 + jnp.tanh(x) @ jnp.exp(-x) * 1e-3, donate_argnums=0)
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(8):
    x = step(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": dsv3c.HOST_MALLOC_TUNED, "temp": temp, "faults": min(faults)}))
"""


def _run(opt_out: bool) -> dict:
    """The fewest faults of a call, in a process set up as a user's is (no test-suite XLA flags or cache)."""
    kept = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, "XLA_FLAGS") and not k.startswith("JAX_")}
    env = kept | {"JAX_PLATFORMS": "cpu"}
    if opt_out:
        env[OPT_OUT] = "1"
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_temporaries_are_reused_not_faulted_in_each_call():
    page = resource.getpagesize()
    tuned, system = _run(opt_out=False), _run(opt_out=True)
    assert tuned["tuned"] and not system["tuned"]
    pages = tuned["temp"] / page
    assert pages > 8_000, "the program's temporaries must be large enough for glibc to map them"
    # glibc's defaults: every call maps the temporaries afresh and faults most of their pages in, the least too
    assert system["faults"] > 0.5 * pages, (system, pages)
    # tuned: the freed heap is reused. Not by every call: when a call's temporaries are allocated before the last
    # call's are freed (more often on a loaded host), the heap grows once more and that call faults every page in,
    # until the heap has room for both; hence the least faulting call.
    assert tuned["faults"] < 0.05 * pages, (tuned, pages)
