"""Compiler passes over dsv3 IR, one `ModulePass` a file; `ALL_PASSES` maps command-line names to them."""

from __future__ import annotations

from collections.abc import Callable

from xdsl.passes import ModulePass


def _dce() -> type[ModulePass]:
    from .dce import DeadCodeElimination

    return DeadCodeElimination


def _drop_mtp() -> type[ModulePass]:
    from .drop_mtp import DropMTP

    return DropMTP


def _shard() -> type[ModulePass]:
    from .shard import ShardPass

    return ShardPass


ALL_PASSES: dict[str, Callable[[], type[ModulePass]]] = {
    "dsv3-dce": _dce,
    "dsv3-drop-mtp": _drop_mtp,
    "dsv3-shard": _shard,
}
