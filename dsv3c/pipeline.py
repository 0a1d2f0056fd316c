"""The pass pipeline: parsing `-p` specs into pass objects, running passes with a verified dump after each. The
default pipeline of each mode belongs to the target (`dsv3c/targets.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass, PassPipeline
from xdsl.utils.arg_spec import ArgSpec, ArgSpecParseError
from xdsl.utils.exceptions import PassFailedException

from .dialects.text import make_context, print_ir, verify_ir
from .frontend.errors import UserError
from .passes import ALL_PASSES


def parse_pipeline(spec: str, callback: Callable[[ModulePass | None, ModuleOp, ModulePass | None], None] | None = None):
    """A `PassPipeline` from `mlir-opt`-style text (`a{opt=v},b`); unknown names or options are user errors."""
    try:
        return PassPipeline.parse_spec(ALL_PASSES, spec, callback)
    except (ValueError, TypeError, ArgSpecParseError) as err:
        known = ", ".join(sorted(ALL_PASSES))
        raise UserError(f"bad pass pipeline '{spec}': {err} (known passes: {known})") from None


def parse_passes(spec: str) -> list[ModulePass]:
    """The pass objects of `mlir-opt`-style text."""
    return list(parse_pipeline(spec).passes) if spec.strip() else []


def pipeline_text(passes: Sequence[ModulePass]) -> str:
    """The `-p` text of a list of passes, every option with a value spelled out (what the report and the progress
    line show)."""
    specs = [p.pipeline_pass_spec(include_default=True) for p in passes]
    return ",".join(
        str(ArgSpec(spec.name, {name: value for name, value in spec.parameters.items() if value})) for spec in specs
    )


def run_pipeline(
    module: ModuleOp,
    passes: str | Sequence[ModulePass],
    locate: Callable[[PassFailedException], Exception] | None = None,
) -> list[tuple[str, str]]:
    """Applies `passes` (objects, or `-p` text) in place, verifying after each; returns (pass name, IR text) per
    pass. A pass that refuses the module (a mesh that does not divide, say) becomes a user error, positioned by
    `locate`."""
    dumps: list[tuple[str, str]] = []

    def after_pass(previous: ModulePass | None, op: ModuleOp, _next: ModulePass | None) -> None:
        if previous is not None:
            verify_ir(op, f"<after {previous.name}>")
            dumps.append((previous.name, print_ir(op)))

    if isinstance(passes, str):
        passes = parse_passes(passes)
    if passes:
        try:
            PassPipeline(tuple(passes), after_pass).apply(make_context(), module)
        except PassFailedException as err:
            raise (locate(err) if locate else UserError(str(err))) from None
    return dumps
