"""The errors dsv3c reports to its users, one hierarchy for the frontend, dialects, passes, targets and runtime:
`Dsv3cError` is what the command line prints as an `error:` line with exit code 2, never as a traceback."""

from __future__ import annotations


class Dsv3cError(Exception):
    """Base of every error caused by the user's input (spec, IR, options, target), not by a bug in dsv3c."""


class SpecError(Dsv3cError):
    """A bad `.dsv3` spec or dsv3 IR file: printed as `PATH:LINE:COL: error: MESSAGE`, exit code 2.

    `line` and `col` are 1-based; 0 means the error has no position (then only the path is printed).
    """

    def __init__(self, message: str, path: str = "<string>", line: int = 0, col: int = 0):
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.col = col

    def __str__(self) -> str:
        if self.line:
            return f"{self.path}:{self.line}:{self.col}: error: {self.message}"
        return f"{self.path}: error: {self.message}"


class UserError(Dsv3cError):
    """A user error with no source position (bad option, impossible target): `dsv3c: error: MESSAGE`, exit 2."""


class DoesNotFitError(UserError):
    """XLA refused a program whose buffers exceed the device's memory. `detail` is XLA's figure, `where` what filled
    the memory at the peak (the memory breakdown's parts; empty when XLA left no buffer dump)."""

    def __init__(self, message: str, detail: str, where: str):
        super().__init__(message)
        self.detail = detail
        self.where = where
