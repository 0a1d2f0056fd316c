"""The pass pipeline: parsing `-p` specs, the default pipeline per mode, and the dump after every pass."""

from __future__ import annotations

from collections.abc import Callable

from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass, PassPipeline
from xdsl.utils.arg_spec import ArgSpecParseError

from .dialects.text import make_context, print_ir, verify_ir
from .frontend.errors import UserError
from .passes import ALL_PASSES

DEFAULT_PIPELINES = {
    "train": "",
    "forward": "dsv3-drop-mtp",
    "prefill": "dsv3-drop-mtp",
    "decode": "dsv3-drop-mtp",
}


def default_pipeline(mode: str) -> str:
    return DEFAULT_PIPELINES[mode]


def parse_pipeline(spec: str, callback: Callable[[ModulePass | None, ModuleOp, ModulePass | None], None] | None = None):
    """A `PassPipeline` from `mlir-opt`-style text (`a{opt=v},b`); unknown names or options are user errors."""
    try:
        return PassPipeline.parse_spec(ALL_PASSES, spec, callback)
    except (ValueError, TypeError, ArgSpecParseError) as err:
        known = ", ".join(sorted(ALL_PASSES))
        raise UserError(f"bad pass pipeline '{spec}': {err} (known passes: {known})") from None


def run_pipeline(module: ModuleOp, spec: str) -> list[tuple[str, str]]:
    """Applies the passes of `spec` in place, verifying after each; returns (pass name, IR text) per pass."""
    dumps: list[tuple[str, str]] = []

    def after_pass(previous: ModulePass | None, op: ModuleOp, _next: ModulePass | None) -> None:
        if previous is not None:
            verify_ir(op, f"<after {previous.name}>")
            dumps.append((previous.name, print_ir(op)))

    if spec.strip():
        parse_pipeline(spec, after_pass).apply(make_context(), module)
    return dumps
