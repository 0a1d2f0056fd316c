"""The `dsv3` dialect object: every op and attribute of the dsv3 modules in one xDSL `Dialect`.

Ops live in modules by concern (`dsv3.py` the model-level ops; later modules add quantisation, caches, sharding);
this file is the one place that lists them all."""

from __future__ import annotations

from xdsl.ir import Dialect

from .attributes import ShardingAttr
from .cache import CACHE_OPS
from .dsv3 import CORE_ATTRS, CORE_OPS
from .kernels import KERNEL_ATTRS
from .latent import LATENT_OPS
from .pipeline import PIPELINE_ATTRS, PIPELINE_OPS
from .quant import QUANT_ATTRS, QUANT_OPS
from .remat import REMAT_ATTRS, REMAT_OPS
from .schedule import SCHEDULE_OPS
from .sharding import SHARDING_OPS

DSV3 = Dialect(
    "dsv3",
    [*CORE_OPS, *SHARDING_OPS, *SCHEDULE_OPS, *LATENT_OPS, *CACHE_OPS, *QUANT_OPS, *REMAT_OPS, *PIPELINE_OPS],
    [ShardingAttr, *CORE_ATTRS, *QUANT_ATTRS, *KERNEL_ATTRS, *REMAT_ATTRS, *PIPELINE_ATTRS],
)
