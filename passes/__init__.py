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


def _fp8_quant() -> type[ModulePass]:
    from .fp8_quant import FP8Quant

    return FP8Quant


def _fuse_head_loss() -> type[ModulePass]:
    from .fuse_head_loss import FuseHeadLossPass

    return FuseHeadLossPass


def _kernels() -> type[ModulePass]:
    from .kernels import KernelsPass

    return KernelsPass


def _kv_cache() -> type[ModulePass]:
    from .kv_cache import KVCache

    return KVCache


def _mla_absorb() -> type[ModulePass]:
    from .mla_absorb import MLAAbsorb

    return MLAAbsorb


def _overlap() -> type[ModulePass]:
    from .overlap import OverlapPass

    return OverlapPass


def _pipeline() -> type[ModulePass]:
    from .pipeline import PipelinePass

    return PipelinePass


def _remat() -> type[ModulePass]:
    from .remat import RematPass

    return RematPass


def _mtp_draft() -> type[ModulePass]:
    from .mtp_draft import MTPDraft

    return MTPDraft


def _shard() -> type[ModulePass]:
    from .shard import ShardPass

    return ShardPass


ALL_PASSES: dict[str, Callable[[], type[ModulePass]]] = {
    "dsv3-dce": _dce,
    "dsv3-drop-mtp": _drop_mtp,
    "dsv3-fp8-quant": _fp8_quant,
    "dsv3-fuse-head-loss": _fuse_head_loss,
    "dsv3-kernels": _kernels,
    "dsv3-kv-cache": _kv_cache,
    "dsv3-mla-absorb": _mla_absorb,
    "dsv3-overlap": _overlap,
    "dsv3-mtp-draft": _mtp_draft,
    "dsv3-pipeline": _pipeline,
    "dsv3-remat": _remat,
    "dsv3-shard": _shard,
}
