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


class OutOfDeviceMemory(Exception):
    """XLA refused the program because its buffers exceed the device's memory. XLA has run buffer assignment by
    then and dumped it (on every platform but a CPU compile without `buffers`), so the optimized HLO and the buffer
    dump say what filled the memory."""

    def __init__(self, detail: str, hlo_text: str, buffers: BufferDump | None):
        super().__init__(detail)
        self.detail, self.hlo_text, self.buffers = detail, hlo_text, buffers


def compile_lowered(lowered: Any, options: dict[str, Any], platform: str) -> tuple[Any, str]:
    """(executable, optimized HLO text). `options` are XLA compiler options (e.g. the overlap pass's)."""
    compiled, text, _ = compile_with_buffers(lowered, options, platform, buffers=False)
    return compiled, text


def compile_with_buffers(
    lowered: Any, options: dict[str, Any], platform: str, buffers: bool
) -> tuple[Any, str, BufferDump | None]:
    """(executable, optimized HLO text, buffer dump when `buffers` and XLA wrote one)."""
    if platform == "cpu" and not buffers:
        try:
            compiled = lowered.compile(compiler_options=options or None)
        except Exception as err:  # JAX raises its JaxRuntimeError for every XLA status
            _raise_if_out_of_memory(err, None)
            raise
        return compiled, compiled.as_text(), None
    with tempfile.TemporaryDirectory(prefix="dsv3c-xla-") as dump:
        try:
            compiled = lowered.compile(
                compiler_options={**options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                                  "xla_dump_hlo_pass_re": "^$"}
            )
        except Exception as err:
            _raise_if_out_of_memory(err, Path(dump))
            raise
        text = _optimized_text(Path(dump)) or compiled.as_text()
        return compiled, text, _read_buffers(Path(dump)) if buffers else None


def _raise_if_out_of_memory(err: Exception, dump: Path | None) -> None:
    """Turns XLA's RESOURCE_EXHAUSTED into OutOfDeviceMemory, with what XLA dumped before it gave up (read whether
    or not the caller asked for buffers: a refused program is when a person most needs them)."""
    if "RESOURCE_EXHAUSTED:" not in str(err):
        return
    detail = str(err).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
    text = _optimized_text(dump) if dump is not None else None
    found = _read_buffers(dump) if dump is not None else None
    raise OutOfDeviceMemory(detail, text or "", found) from None


def _optimized_text(directory: Path) -> str | None:
    """The optimized HLO of the largest module XLA dumped (the step), if it dumped one."""
    dumped = sorted(directory.glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
    return dumped[-1].read_text() if dumped else None


def _read_buffers(directory: Path) -> BufferDump | None:
    """The buffer assignment and live ranges of the largest module XLA dumped (the step; small helper modules such
    as a sharding's constant folding come with it)."""
    assignments = sorted(directory.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        return None
    live = assignments[-1].with_name(assignments[-1].name.replace("-buffer-assignment.txt", "-live-range.txt"))
    return BufferDump(assignments[-1].read_text(), live.read_text()) if live.exists() else None
