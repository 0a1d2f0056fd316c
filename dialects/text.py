"""Reading and writing dsv3 IR as text, with errors that point into the file.

xDSL reports parse errors with a span but verification errors only with the op; `parse_ir` remembers where each op
was read so that a verifier's complaint about a hand-edited file comes back as `PATH:LINE:COL: error: ...`.
"""

from __future__ import annotations

import re

from xdsl.context import Context
from xdsl.dialects.builtin import Builtin, ModuleOp
from xdsl.dialects.func import Func
from xdsl.ir import Operation
from xdsl.parser import Parser
from xdsl.utils.exceptions import DiagnosticException, ParseError, VerifyException

from ..frontend.errors import SpecError
from ..frontend.limits import MAX_IR_BYTES
from .checks import module_problems
from .dialect import DSV3


def make_context() -> Context:
    """A context with the dialects a dsv3 program uses."""
    ctx = Context()
    for dialect in (Builtin, Func, DSV3):
        ctx.load_dialect(dialect)
    return ctx


class _PositionRecordingParser(Parser):
    """A parser that remembers the (line, col) at which each operation starts."""

    def __init__(self, ctx: Context, text: str, name: str):
        super().__init__(ctx, text, name)
        self.positions: dict[int, tuple[int, int]] = {}
        self._text = text

    def parse_operation(self) -> Operation:
        start = self._current_token.span.start
        op = super().parse_operation()
        line = self._text.count("\n", 0, start) + 1
        col = start - (self._text.rfind("\n", 0, start) + 1) + 1
        self.positions[id(op)] = (line, col)
        return op


def parse_ir(text: str, path: str = "<string>") -> ModuleOp:
    """Parses and verifies dsv3 IR; any problem raises `SpecError` positioned at the offending text."""
    return parse_ir_with_positions(text, path)[0]


def parse_ir_with_positions(text: str, path: str = "<string>") -> tuple[ModuleOp, dict[int, tuple[int, int]]]:
    """`parse_ir`, also returning where each op starts (keyed by `id(op)`), for errors found by later passes."""
    if len(text) > MAX_IR_BYTES:
        raise SpecError(f"IR text larger than {MAX_IR_BYTES >> 20} MiB", path)
    _check_strings(text, path)
    try:
        # The parser lexes its first token on construction, so that too can fail.
        parser = _PositionRecordingParser(make_context(), text, path)
        module = parser.parse_module()
    except ParseError as err:
        raise _parse_error(err, text, path) from None
    except (VerifyException, DiagnosticException) as err:
        # Attributes are built (and checked) while parsing: `32 : i0` fails there, not in a verifier.
        span = parser._current_token.span.get_location()
        raise SpecError(str(err).strip().splitlines()[0], path, span.line, span.col) from None
    except (RecursionError, OverflowError, ValueError) as err:
        # xDSL parses nested types and attributes recursively and converts numbers without bounds.
        raise SpecError(f"IR the parser cannot handle: {type(err).__name__}: {err}", path) from None
    verify_ir(module, path, parser.positions)
    return module, parser.positions


# xDSL's own string pattern (its `_unescaped_characters_regex`), then an unmatched quote. Its pattern nests
# quantifiers, so an unterminated string makes it backtrack exponentially: a string literal that does not close on
# its line took minutes. This scan is linear (one alternative per character) and runs first.
_STRING_SCAN = re.compile(r'//[^\n]*|"(?:[^"\\\n\v\f]|\\(?:["nt\\]|[0-9A-Fa-f]{2}))*"|"')


def _check_strings(text: str, path: str) -> None:
    for match in _STRING_SCAN.finditer(text):
        if match.group() == '"':
            start = match.start()
            line = text.count("\n", 0, start) + 1
            col = start - (text.rfind("\n", 0, start) + 1) + 1
            raise SpecError("unterminated string literal (or a bad escape in it)", path, line, col)


def _parse_error(err: ParseError, text: str, path: str) -> SpecError:
    """xDSL's parse error, with its message completed: some lexer messages keep an unfilled `{first_char}`."""
    loc = err.span.get_location()
    start = err.span.start
    char = text[start] if start < len(text) else ""
    message = err.msg.strip().replace("{first_char}", repr(char)) or "unexpected end of input"
    if char == "#" and not text[text.rfind("\n", 0, start) + 1 : start].strip():
        message = "unexpected '#': IR comments start with '//' (is this a .dsv3 spec? `dsv3c compile` reads those)"
    elif loc.line and start >= len(text.rstrip()):
        message = f"unexpected end of input ({message})"
    return SpecError(message, path, loc.line, loc.col)


def verify_ir(module: ModuleOp, path: str = "<ir>", positions: dict[int, tuple[int, int]] | None = None) -> None:
    """Verifies every op innermost first, so the message names the op that is actually wrong."""
    for op in reversed(list(module.walk())):
        try:
            op.verify()
        except (VerifyException, DiagnosticException) as err:
            line, col = (positions or {}).get(id(op), (0, 0))
            message = str(err).strip().splitlines()[0] if str(err).strip() else f"invalid '{op.name}'"
            raise SpecError(message, path, line, col) from None
    for op, message in module_problems(module):
        line, col = (positions or {}).get(id(op), (0, 0))
        raise SpecError(message, path, line, col)


def print_ir(module: Operation) -> str:
    """The textual form that `parse_ir` reads back to an identical module."""
    return str(module) + "\n"
