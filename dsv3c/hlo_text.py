"""Reading XLA's optimized HLO text: its computations, the instructions in them, and which computations call which.
The report reads collectives and their overlap from it, the memory breakdown where each buffer was made."""

from __future__ import annotations

import re

HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
"""The first line of a computation: its name, then its signature, then `{`."""
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
"""An instruction: its name, its opcode, and the rest of the line (operands and attributes)."""
CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
"""The computations an instruction calls (fusions, reductions, loops, conditionals)."""


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """HLO text split into computations by name; also returns the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            comps[current].append(line)
    return comps, entry
