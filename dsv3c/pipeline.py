"""The pass pipeline: parsing `-p` specs, the default pipeline per mode, and the dump after every pass."""

from __future__ import annotations

from collections.abc import Callable

from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass, PassPipeline
from xdsl.utils.arg_spec import ArgSpecParseError
from xdsl.utils.exceptions import PassFailedException

from .dialects.text import make_context, print_ir, verify_ir
from .frontend.errors import UserError
from .passes import ALL_PASSES

DEFAULT_PIPELINES = {
    # DeepSeek-V3's recompute policy; `keep` honours one already in the IR (a hand-edited `.mlir`).
    "train": "dsv3-remat{policy=deepseek keep=true}",
    "forward": "dsv3-drop-mtp",
    "prefill": "dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache",
    "decode": "dsv3-drop-mtp,dsv3-mla-absorb,dsv3-kv-cache",
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


def run_pipeline(
    module: ModuleOp, spec: str, locate: Callable[[PassFailedException], Exception] | None = None
) -> list[tuple[str, str]]:
    """Applies the passes of `spec` in place, verifying after each; returns (pass name, IR text) per pass. A pass
    that refuses the module (a mesh that does not divide, say) becomes a user error, positioned by `locate`."""
    dumps: list[tuple[str, str]] = []

    def after_pass(previous: ModulePass | None, op: ModuleOp, _next: ModulePass | None) -> None:
        if previous is not None:
            verify_ir(op, f"<after {previous.name}>")
            dumps.append((previous.name, print_ir(op)))

    if spec.strip():
        try:
            parse_pipeline(spec, after_pass).apply(make_context(), module)
        except PassFailedException as err:
            raise (locate(err) if locate else UserError(str(err))) from None
    return dumps
