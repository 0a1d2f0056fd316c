"""dsv3c: a compiler for DeepSeek-V3-family models.

Text (`.dsv3`) -> typed spec -> dsv3 IR (xDSL) -> passes -> JAX -> StableHLO -> XLA. This module is the public face;
everything a user needs is re-exported here.
"""

from .frontend.builder import build_ir
from .frontend.errors import SpecError, UserError
from .frontend.parser import load, parse
from .frontend.spec import ModelSpec
from .program import Program, compile, prepare, write_dumps
from .runtime.hf_export import export_hf
from .runtime.hf_import import import_hf

__all__ = [
    "ModelSpec", "Program", "SpecError", "UserError", "build_ir", "compile", "export_hf", "import_hf", "load", "parse",
    "prepare", "write_dumps",
]
