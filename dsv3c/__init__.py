"""dsv3c: a compiler for DeepSeek-V3-family models.

Text (`.dsv3`) -> typed spec -> dsv3 IR (xDSL) -> passes -> JAX -> StableHLO -> XLA. This module is the public face;
everything a user needs is re-exported here. The names that need JAX (compiling, running, HF import and export) are
imported on first use, so that `dsv3c opt` and the other IR-only paths start without loading JAX.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .frontend.builder import build_ir
from .frontend.errors import SpecError, UserError
from .frontend.parser import load, parse
from .frontend.spec import ModelSpec
from .runtime.host_memory import configure_jax, keep_freed_host_memory

# Before anything loads JAX (nothing above does): XLA:CPU's threads pick their allocator arenas when they first
# allocate. JAX itself is configured when a module that runs programs loads it, or now if the caller already has.
HOST_MALLOC_TUNED = keep_freed_host_memory()
if "jax" in sys.modules:
    configure_jax()

if TYPE_CHECKING:
    from .planner import PlanRow, plan
    from .program import Program, compile, prepare, write_dumps
    from .runtime.hf_export import export_hf
    from .runtime.hf_import import import_hf

_LAZY = {
    "Program": ".program", "compile": ".program", "prepare": ".program", "write_dumps": ".program",
    "plan": ".planner", "PlanRow": ".planner",
    "export_hf": ".runtime.hf_export", "import_hf": ".runtime.hf_import",
}

__all__ = [
    "ModelSpec", "PlanRow", "Program", "SpecError", "UserError", "build_ir", "compile", "export_hf", "import_hf",
    "load", "parse", "plan", "prepare", "write_dumps",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dsv3c' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
