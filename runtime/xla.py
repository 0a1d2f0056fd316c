"""Compiling a lowered program with XLA and reading back what it compiled.

The optimized HLO text comes from XLA's own dump when compiling for TPU or GPU: `Compiled.as_text()` round-trips the
module through a proto, which libtpu's asynchronous collectives do not survive."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def compile_lowered(lowered: Any, options: dict[str, Any], platform: str) -> tuple[Any, str]:
    """(executable, optimized HLO text). `options` are XLA compiler options (e.g. the overlap pass's)."""
    if platform == "cpu":
        compiled = lowered.compile(compiler_options=options or None)
        return compiled, compiled.as_text()
    with tempfile.TemporaryDirectory(prefix="dsv3c-xla-") as dump:
        compiled = lowered.compile(
            compiler_options={**options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                              "xla_dump_hlo_pass_re": "^$"}
        )
        dumped = sorted(Path(dump).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
        text = dumped[-1].read_text() if dumped else compiled.as_text()
    return compiled, text
