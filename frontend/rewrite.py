"""Writing a `parallel { ... }` block into spec text, every other byte kept as it was.

`dsv3c plan --write-spec` puts its winner into the user's own file: comments, layout and the order of entries are
theirs, so the block replaces an existing top-level `parallel` entry in place (from its key to its closing brace),
or is appended at the end.
"""

from __future__ import annotations

import re

from .parser import parse
from .spec import ParallelSpec

_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[{}]')
"""Strings and comments (skipped whole, so a brace inside one is not counted) and braces."""


def parallel_block(layout: ParallelSpec, comment: str = "") -> str:
    """The block's text, one entry a line, with `comment` (a line, no newline) as its first line."""
    mesh = ", ".join(f"{axis} {size}" for axis, size in layout.mesh.items())
    lines = [f"  # {comment}"] if comment else []
    lines += [f"  mesh {{ {mesh} }}", f"  shard_mode {layout.shard_mode}"]
    if layout.remat is not None:
        lines.append(f"  remat {layout.remat}")
    lines.append(f"  head_loss {layout.head_loss}")
    if layout.target is not None:
        lines.append(f"  target {layout.target}")
    return "parallel {\n" + "\n".join(lines) + "\n}"


def with_parallel_block(text: str, path: str, block: str) -> str:
    """`text` (a valid spec, named `path` in errors) with `block` in place of its `parallel` entry, or after its
    last line when it has none."""
    at = parse(text, path).positions.get("model.parallel")
    if at is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + block + "\n"
    start = _offset(text, *at)
    end = _closing_brace(text, start) + 1
    return text[:start] + block + text[end:]


def _offset(text: str, line: int, col: int) -> int:
    """The index of a 1-based (line, column) position."""
    lines = text.split("\n")
    return sum(len(before) + 1 for before in lines[: line - 1]) + col - 1


def _closing_brace(text: str, start: int) -> int:
    """The index of the `}` that closes the first `{` after `start` (the text parsed, so there is one)."""
    depth = 0
    for match in _SCAN.finditer(text, start):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return match.start()
    raise AssertionError("a parsed parallel block has its closing brace")
