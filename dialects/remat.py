"""The recompute (activation checkpointing) op: what the backward pass keeps of each value inside a layer.

`dsv3-remat` tags the values of each layer with `dsv3.checkpoint` and marks the `dsv3.layer_stack` with the policy
it applied (`remat = "deepseek"`). The lowering wraps such a layer (unless `remat = "none"`) in `jax.checkpoint`
whose policy is read off the tags alone: values tagged `save` stay in device memory between forward and backward,
values tagged `offload` are kept in host memory (`pinned_host`), and everything else (values tagged `recompute`,
and every intermediate inside an op, such as the attention probabilities) is recomputed from what was kept. Editing
one tag in an IR file changes what the compiled program stores.
"""

from __future__ import annotations

from enum import auto

from xdsl.dialects.builtin import StringAttr, TensorType
from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import Attribute, SpacedOpaqueSyntaxAttribute, SSAValue
from xdsl.irdl import (
    IRDLOperation,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    prop_def,
    result_def,
    traits_def,
)
from xdsl.traits import Pure
from xdsl.utils.str_enum import StrEnum

from .dsv3 import LayerStackOp, _Op

POLICIES = ("none", "outputs", "deepseek", "full")
"""The recompute policies of `dsv3-remat`, from keeping everything to keeping only each layer's input; a spec's
`parallel { remat ... }` and the `dsv3.parallel` declaration name one of them."""


class RematAction(StrEnum):
    """What the backward pass of a layer does with a tagged value."""

    SAVE = auto()
    """Kept in device memory from the forward pass."""
    OFFLOAD = auto()
    """Kept in host memory (`pinned_host`) and brought back for the backward pass."""
    RECOMPUTE = auto()
    """Not kept: recomputed from what was."""


@irdl_attr_definition
class RematActionAttr(EnumAttribute[RematAction], SpacedOpaqueSyntaxAttribute):
    """`#dsv3<action save>`."""

    name = "dsv3.action"


@irdl_op_definition
class CheckpointOp(_Op):
    """Identity on values; names its result `name` (a `jax.ad_checkpoint.checkpoint_name`) and says what the
    backward pass of the enclosing layer does with it: `save`, `offload` (to host memory) or `recompute`. Names are
    unique within a layer, so a policy can refer to each value."""

    name = "dsv3.checkpoint"
    x = operand_def(TensorType)
    value_name = prop_def(StringAttr, prop_name="name")
    action = prop_def(RematActionAttr)
    result = result_def(TensorType)
    traits = traits_def(Pure())

    def __init__(self, x: SSAValue, name: str, action: RematAction):
        super().__init__(
            operands=[x], result_types=[x.type],
            properties={"name": StringAttr(name), "action": RematActionAttr(action)},
        )

    @property
    def tag(self) -> str:
        return self.value_name.data

    def verify_(self) -> None:
        self.expect(self.x.type == self.result.type, "result type must equal the operand type")
        self.expect(bool(self.tag), "name must not be empty")
        parent = self.parent_op()
        self.expect(isinstance(parent, LayerStackOp), "must be inside a dsv3.layer_stack (a policy is per layer)")
        block = self.parent_block()
        assert block is not None
        for other in block.ops:
            if other is not self and isinstance(other, CheckpointOp) and other.tag == self.tag:
                self.fail(f"name '{self.tag}' is used twice in this layer")


REMAT_OPS: list[type[IRDLOperation]] = [CheckpointOp]
"""The recompute ops; `dialects/dialect.py` adds them to the dsv3 dialect."""

REMAT_ATTRS: list[type[Attribute]] = [RematActionAttr]
"""The recompute attributes."""
