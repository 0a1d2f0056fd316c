"""README.md shows what the code does today: its error examples, its IR excerpt, the pipeline its first command
runs, and its Python API snippet run as written (the training sample's losses are checked in test_train.py, beside
the run that produces them)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.dialects.text import print_ir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = (ROOT / "examples" / "tiny.dsv3").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize(("name", "old", "new"), [
    ("bad.dsv3", "top_k 2,", "top_k 9,"),
    ("typo.dsv3", "heads 4", "hedas 4"),
])
def test_error_examples_are_what_the_cli_prints(name, old, new, tmp_path, monkeypatch, capsys):
    assert old in TINY
    (tmp_path / name).write_text(TINY.replace(old, new, 1))
    monkeypatch.chdir(tmp_path)
    assert main(["compile", name]) == 2
    printed = capsys.readouterr().err.strip()
    assert f"$ dsv3c compile {name}\n{printed}\n" in README


def test_ir_excerpt_lines_are_in_tinys_ir():
    """Every whole line of the README's IR excerpt (lines with `...` elide operands) is a line of `tiny`'s IR."""
    ir_lines = {line.strip() for line in print_ir(dsv3c.build_ir(dsv3c.parse(TINY))).splitlines()}
    excerpt = _blocks("mlir")[0]
    whole = [line.strip() for line in excerpt.splitlines() if line.strip() and "..." not in line]
    assert len(whole) >= 10
    missing = [line for line in whole if line not in ir_lines]
    assert not missing, missing


def test_first_command_runs_the_pipeline_shown():
    shown = re.search(r"^ran passes \[(.*)\] \(", README, re.MULTILINE).group(1)
    assert dsv3c.prepare(ROOT / "examples" / "tiny.dsv3", batch=16, seq=64).pipeline == shown


def test_python_api_snippet_runs_as_written(monkeypatch):
    """The snippet, executed from the repository root; its comments' shapes and keys then checked."""
    snippet = next(block for block in _blocks("python") if "prog.train_step" in block)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code is the test
    metrics, logits, state = scope["metrics"], scope["logits"], scope["state"]
    assert scope["tokens"].shape == (16, 65) and scope["tokens"].dtype == np.int32
    keys = re.search(r"# metrics: (.*)", snippet).group(1).replace(" [MoE layers, experts]", "").split(", ")
    assert set(keys) <= set(metrics), set(keys) - set(metrics)
    assert metrics["expert_load"].shape == (3, 8)
    assert logits.shape == (16, 64, 256) and logits.dtype == np.float32
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
