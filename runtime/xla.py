"""Compiling a lowered program with XLA and reading back what it compiled.

The optimized HLO text comes from XLA's own dump when compiling for TPU or GPU: `Compiled.as_text()` round-trips the
module through a proto, which libtpu's asynchronous collectives do not survive. The same dump holds the buffer
assignment and the live ranges the report's `memory_breakdown` reads; they are read only when asked for."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BufferDump:
    """XLA's buffer assignment (every allocation and the values packed into it) and the live range of each value
    in the flattened schedule, as XLA dumps them."""

    assignment: str
    live_ranges: str


def compile_lowered(lowered: Any, options: dict[str, Any], platform: str) -> tuple[Any, str]:
    """(executable, optimized HLO text). `options` are XLA compiler options (e.g. the overlap pass's)."""
    compiled, text, _ = compile_with_buffers(lowered, options, platform, buffers=False)
    return compiled, text


def compile_with_buffers(
    lowered: Any, options: dict[str, Any], platform: str, buffers: bool
) -> tuple[Any, str, BufferDump | None]:
    """(executable, optimized HLO text, buffer dump when `buffers` and XLA wrote one)."""
    if platform == "cpu" and not buffers:
        compiled = lowered.compile(compiler_options=options or None)
        return compiled, compiled.as_text(), None
    with tempfile.TemporaryDirectory(prefix="dsv3c-xla-") as dump:
        compiled = lowered.compile(
            compiler_options={**options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                              "xla_dump_hlo_pass_re": "^$"}
        )
        dumped = sorted(Path(dump).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
        text = dumped[-1].read_text() if dumped else compiled.as_text()
        return compiled, text, _read_buffers(Path(dump)) if buffers else None


def _read_buffers(directory: Path) -> BufferDump | None:
    """The buffer assignment and live ranges of the largest module XLA dumped (the step; small helper modules such
    as a sharding's constant folding come with it)."""
    assignments = sorted(directory.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        return None
    live = assignments[-1].with_name(assignments[-1].name.replace("-buffer-assignment.txt", "-live-range.txt"))
    return BufferDump(assignments[-1].read_text(), live.read_text()) if live.exists() else None
