"""Runs the IR-in/IR-out pass tests of `tests/filecheck/` (lit + filecheck) as part of the pytest run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FILECHECK_DIR = Path(__file__).resolve().parent / "filecheck"


def test_filecheck_suite_passes() -> None:
    # `lit` has no `__main__`, so run its entry point with this interpreter (the lit.cfg puts this interpreter's bin
    # directory, with `dsv3c` and `filecheck`, first on PATH).
    cmd = [sys.executable, "-c", "from lit.main import main; main()", "-v", str(FILECHECK_DIR)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    tests = sorted(p.name for p in FILECHECK_DIR.glob("*.mlir"))
    assert len(tests) >= 4, tests
    for name in tests:
        assert f"PASS: dsv3c-filecheck :: {name}" in output, output
