"""Ops that place the program on a device mesh: the layout a spec asks for, the mesh declaration and sharding
constraints on values.

The builder writes `dsv3.parallel` from a spec's `parallel { ... }` block; the shard pass writes the others; the
lowering turns `dsv3.mesh` into a `jax.sharding.Mesh` over the target's devices, parameter shardings into the jitted
function's argument shardings, and each `dsv3.shard` into a sharding constraint (`auto` mode: XLA's partitioner
propagates from there) or an explicit `reshard` (`explicit` mode)."""

from __future__ import annotations

from collections.abc import Mapping

from xdsl.dialects.builtin import ArrayAttr, IntegerAttr, StringAttr, TensorType
from xdsl.ir import SSAValue
from xdsl.irdl import (
    IRDLOperation,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    result_def,
    traits_def,
)
from xdsl.traits import Pure

from .attributes import ShardingAttr
from .dsv3 import _Op, shape_of
from .remat import POLICIES

MESH_AXES = ("pipe", "data", "fsdp", "fsdp_transpose", "expert", "tensor", "tensor_transpose")
"""The mesh axes dsv3c knows, in the order they are laid out on devices (the last varies fastest)."""

BATCH_AXES = ("data", "fsdp", "fsdp_transpose", "expert")
"""Mesh axes the token batch is split over (the shard pass's `activation_batch` rule)."""


HEAD_LOSS = ("unfused", "fused")
"""How a training step computes the output head and its loss: as a matmul then a cross-entropy over the whole logits,
or fused over sequence slices (`dsv3-fuse-head-loss`)."""


@irdl_op_definition
class ParallelOp(_Op):
    """The layout a training run asks for (a spec's `parallel` block, or what `dsv3c plan` chose): the mesh, the
    sharding mode, the recompute policy (absent: the target's default) and the head-loss form. `dsv3c.compile`
    takes each as its default where the caller gives none; the mesh and mode apply in every mode, the passes to
    training. With `target`, only compiles for that target use it, so that a spec planned for a TPU slice still
    trains on the CPU."""

    name = "dsv3.parallel"
    axes = prop_def(ArrayAttr[StringAttr])
    shape = prop_def(ArrayAttr[IntegerAttr])
    mode = prop_def(StringAttr)
    remat = opt_prop_def(StringAttr)
    head_loss = prop_def(StringAttr)
    target = opt_prop_def(StringAttr)
    assembly_format = "attr-dict"

    def __init__(
        self, mesh: Mapping[str, int], mode: str, remat: str | None, head_loss: str, target: str | None = None
    ):
        """`mesh` is each axis's size; it is stored in the canonical axis order, as `dsv3.mesh` is."""
        ordered = {axis: mesh[axis] for axis in MESH_AXES if axis in mesh} | dict(mesh)
        super().__init__(properties={
            "axes": ArrayAttr([StringAttr(a) for a in ordered]),
            "shape": ArrayAttr([IntegerAttr(s, 64) for s in ordered.values()]),
            "mode": StringAttr(mode),
            "remat": StringAttr(remat) if remat is not None else None,
            "head_loss": StringAttr(head_loss),
            "target": StringAttr(target) if target is not None else None,
        })

    @property
    def sizes(self) -> dict[str, int]:
        return {a.data: s.value.data for a, s in zip(self.axes.data, self.shape.data, strict=True)}

    @property
    def remat_policy(self) -> str | None:
        return self.remat.data if self.remat is not None else None

    @property
    def target_name(self) -> str | None:
        return self.target.data if self.target is not None else None

    def verify_(self) -> None:
        names = [a.data for a in self.axes.data]
        self.expect(len(names) == len(self.shape.data), "axes and shape must have the same length")
        self.expect(bool(names), "the mesh needs at least one axis")
        unknown = [n for n in names if n not in MESH_AXES]
        self.expect(not unknown, f"unknown mesh axis {unknown} (known: {', '.join(MESH_AXES)})")
        self.expect(len(set(names)) == len(names), "mesh axes must be distinct")
        self.expect(all(s.value.data >= 1 for s in self.shape.data), "mesh axis sizes must be positive")
        self.expect(self.mode.data in ("auto", "explicit"), "mode must be auto or explicit")
        policy = self.remat_policy
        self.expect(policy is None or policy in POLICIES, f"remat must be one of {', '.join(POLICIES)}")
        self.expect(self.head_loss.data in HEAD_LOSS, f"head_loss must be one of {', '.join(HEAD_LOSS)}")


@irdl_op_definition
class MeshOp(_Op):
    """The device mesh: named axes and their sizes, and the sharding mode (`auto` or `explicit`)."""

    name = "dsv3.mesh"
    axes = prop_def(ArrayAttr[StringAttr])
    shape = prop_def(ArrayAttr[IntegerAttr])
    mode = prop_def(StringAttr)
    assembly_format = "attr-dict"

    def __init__(self, shape: Mapping[str, int], mode: str):
        """`shape` is each mesh axis's size, major to minor."""
        super().__init__(properties={
            "axes": ArrayAttr([StringAttr(a) for a in shape]),
            "shape": ArrayAttr([IntegerAttr(s, 64) for s in shape.values()]),
            "mode": StringAttr(mode),
        })

    @property
    def sizes(self) -> dict[str, int]:
        return {a.data: s.value.data for a, s in zip(self.axes.data, self.shape.data, strict=True)}

    def verify_(self) -> None:
        names = [a.data for a in self.axes.data]
        self.expect(len(names) == len(self.shape.data), "axes and shape must have the same length")
        unknown = [n for n in names if n not in MESH_AXES]
        self.expect(not unknown, f"unknown mesh axis {unknown} (known: {', '.join(MESH_AXES)})")
        self.expect(len(set(names)) == len(names), "mesh axes must be distinct")
        self.expect(all(s.value.data >= 1 for s in self.shape.data), "mesh axis sizes must be positive")
        self.expect(self.mode.data in ("auto", "explicit"), "mode must be auto or explicit")


@irdl_op_definition
class ShardOp(_Op):
    """Identity on values; states the layout `sharding` of its result."""

    name = "dsv3.shard"
    x = operand_def(TensorType)
    sharding = prop_def(ShardingAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, sharding: ShardingAttr):
        super().__init__(operands=[x], result_types=[x.type], properties={"sharding": sharding})

    def verify_(self) -> None:
        self.expect(self.x.type == self.result.type, "result type must equal the operand type")
        rank, dims = len(shape_of(self.x)), len(self.sharding.axes)
        self.expect(rank == dims, f"sharding has {dims} dimensions for a rank-{rank} value")


SHARDING_OPS: list[type[IRDLOperation]] = [ParallelOp, MeshOp, ShardOp]
