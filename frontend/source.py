"""Reading a user's file (a `.dsv3` spec or a `.mlir` IR file) as text, with every failure a positioned `SpecError`.

Both front ends read through here so that a directory, an unreadable or oversized file and bytes that are not UTF-8
all end as one `error:` line instead of an `OSError` or `UnicodeDecodeError` traceback."""

from __future__ import annotations

from pathlib import Path

from .errors import SpecError


def read_source(path: str | Path, what: str, limit: int) -> str:
    """The text of `path`; `what` names the kind of file in messages ("spec", "IR file"), `limit` caps its size in
    bytes. A bad byte is reported at its line and column."""
    name = str(path)
    path = Path(path)
    try:
        if path.is_dir():
            raise SpecError(f"cannot read {what}: it is a directory", name)
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise SpecError(f"cannot read {what}: {exc.strerror or exc}", name) from None
    if len(data) > limit:
        raise SpecError(f"cannot read {what}: larger than {limit >> 10} KiB (is this the right file?)", name)
    return decode_source(data, name, what)


def decode_source(data: bytes, name: str, what: str) -> str:
    """UTF-8 text of `data`, or a `SpecError` at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} ({exc.reason}); a {what} must be UTF-8"
        raise SpecError(message, name, line, col) from None
