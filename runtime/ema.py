"""The exponential moving average of the trainable parameters, kept in host memory (as DeepSeek-V3 keeps it in CPU
memory) so that it costs the accelerator no HBM.

`ema = decay * ema + (1 - decay) * params` after every applied step, starting from the initial parameters. The
update is one jitted function dispatched after the step and never waited for: JAX runs it while the next step is
enqueued. Where the devices offer a `pinned_host` memory (TPU, GPU, and XLA:CPU in this JAX) the EMA lives there,
and the update moves it to device memory, mixes in the parameters and writes it back; elsewhere it stays in the
default memory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Sharding, SingleDeviceSharding

HOST_MEMORY = "pinned_host"

Params = dict[str, jax.Array]


def host_memory_kind(device: Any) -> str | None:
    """`pinned_host` where `device` can address it (and it is not already the device's own memory), else None."""
    kinds = {memory.kind for memory in device.addressable_memories()}
    return HOST_MEMORY if HOST_MEMORY in kinds and device.default_memory().kind != HOST_MEMORY else None


def device_shardings(params: dict[str, Any], shardings: dict[str, Sharding] | None) -> dict[str, Sharding]:
    """Where each parameter lives in device memory: the program's shardings, or the first device without a mesh."""
    if shardings is not None:
        return dict(shardings)
    device = jax.devices()[0]
    return {name: SingleDeviceSharding(device) for name in params}


def host_shardings(on_device: dict[str, Sharding]) -> dict[str, Sharding]:
    """The same layouts in host memory, where the devices have one."""
    out = {}
    for name, sharding in on_device.items():
        kind = host_memory_kind(next(iter(sharding.device_set)))
        out[name] = sharding.with_memory_kind(kind) if kind else sharding
    return out


class EMA:
    """The EMA's placement and its two functions: `init` (a host copy of the parameters) and `update`."""

    def __init__(self, decay: float, on_device: dict[str, Sharding]):
        self.decay = decay
        self.on_device = on_device
        self.on_host = host_shardings(on_device)
        self._update = jax.jit(self._mix, out_shardings=self.on_host, donate_argnums=0)

    def init(self, params: Params) -> Params:
        """The EMA before any step: a copy of the parameters in host memory."""
        return {name: jax.device_put(value, self.on_host[name], may_alias=False) for name, value in params.items()}

    def update(self, ema: Params, params: Params, skipped: jax.Array) -> Params:
        """The EMA after a step; unchanged when the step was skipped (non-finite). `ema` is donated."""
        return self._update(ema, params, skipped)

    def _mix(self, ema: Params, params: Params, skipped: jax.Array) -> Params:
        out = {}
        for name, value in params.items():
            average = jax.device_put(ema[name], self.on_device[name])  # host -> device, inside the program
            mixed = (self.decay * average + (1.0 - self.decay) * value).astype(average.dtype)
            out[name] = jnp.where(skipped > 0, average, mixed)
        return out

