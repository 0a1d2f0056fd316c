"""The tables of lowering rules: one function per dsv3 op type, from JAX operands to JAX results, and the kernels
that ops with a choice of implementation (attention cores, grouped expert GEMMs) can be lowered to.

Lowering is an interpretation of the IR under a JAX trace: `lower_block` walks a block's ops in order, looks each
op's rule up in `LOWERINGS`, and binds its results. Because it runs inside `jax.jit`, the result is one XLA program;
nothing here reads a spec. An op's rule finds its implementation with `kernel_impl`: the kernel the op's `kernel`
attribute names (set by `dsv3-kernels` from the target's choices, or by hand), or the op's plain form. A new kernel
is one `register_kernel` function; a target offers it by naming it in its kernel choices (`dsv3c/targets.py`).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.dialects.func import ReturnOp
from xdsl.ir import Block, Operation, SSAValue

from ...dialects import dsv3
from ...dialects.kernels import Kernel

Rule = Callable[[Any, Sequence[jax.Array], "LoweringContext"], Sequence[jax.Array]]
LOWERINGS: dict[type[Operation], Rule] = {}
KERNELS: dict[tuple[type[Operation], Kernel], Callable[..., Any]] = {}
"""(op type, kernel) -> implementation. The signature is the op family's: attention kernels take the op's operands,
`scale` and the context; grouped-GEMM kernels are `GroupedGemm`s (`runtime/lower/experts.py`)."""

FP8_BACKEND_ATTR = "dsv3.fp8_backend"
"""Module attribute naming how FP8 GEMMs run (`exact`, `emulate`, `native`), written by `dsv3-kernels`."""


def register_lowering(op_type: type[Operation]) -> Callable[[Rule], Rule]:
    """Registers `rule` as the lowering of `op_type`."""

    def register(rule: Rule) -> Rule:
        LOWERINGS[op_type] = rule
        return rule

    return register


def register_kernel(op_type: type[Operation], kernel: Kernel) -> Callable[[Callable], Callable]:
    """Registers an implementation of `op_type` under `kernel`."""

    def register(impl: Callable) -> Callable:
        KERNELS[(op_type, kernel)] = impl
        return impl

    return register


def kernel_impl(op: Operation, default: Kernel) -> Callable[..., Any]:
    """The implementation the op's `kernel` attribute asks for, or `default` (the op's plain form)."""
    kernel = op.kernel_choice() or default
    impl = KERNELS.get((type(op), kernel))
    if impl is None:
        raise LoweringError(f"'{op.name}' has no '{kernel.value}' kernel")
    return impl


class Output(NamedTuple):
    """One `dsv3.output` as traced: its report name, its role, its value and its loss weight (loss roles only)."""

    name: str
    role: dsv3.OutputRole
    value: jax.Array
    weight: float | None


@dataclass
class LoweringContext:
    """What rules share while one program is traced: the parameters by name, the device mesh (None on one device)
    and whether its axes are explicit, how FP8 GEMMs run (`fp8_backend`, from the module), whether weight gradients
    keep the compute dtype (`grads_in_compute_dtype`, from the optimizer, `runtime/lower/weights.py`) and, when
    `weight_casts` is a dict, which weights were cast that way (to what dtype), the named outputs
    collected so far, the bias updates to apply after the step, the environment of values in scope, and for inference
    steps the caches read (`caches`) and written back (`cache_stores`) by name."""

    params: dict[str, jax.Array]
    mesh: jax.sharding.Mesh | None = None
    explicit: bool = False
    fp8_backend: str = "exact"
    grads_in_compute_dtype: bool = False
    weight_casts: dict[SSAValue, Any] | None = None
    outputs: list[Output] = field(default_factory=list)
    bias_updates: list[tuple[str, jax.Array, float]] = field(default_factory=list)
    env: MutableMapping[SSAValue, jax.Array] = field(default_factory=dict)
    caches: dict[str, jax.Array] = field(default_factory=dict)
    cache_stores: dict[str, jax.Array] = field(default_factory=dict)

    @classmethod
    def for_module(cls, module: ModuleOp, params: dict[str, jax.Array], **fields: Any) -> LoweringContext:
        """A context for lowering `module`, with what its module-level attributes decide."""
        backend = module.attributes.get(FP8_BACKEND_ATTR)
        optimizer = dsv3.find_optimizer(module)
        return cls(
            params=params,
            fp8_backend=backend.data if isinstance(backend, StringAttr) else "exact",
            grads_in_compute_dtype=optimizer is not None and optimizer.grads.data == "compute",
            **fields,
        )


class LoweringError(Exception):
    """An op the lowering cannot handle (no rule registered, a parameter missing)."""


def lower_block(block: Block, ctx: LoweringContext) -> list[jax.Array]:
    """Evaluates `block` in `ctx.env`; returns the values of its terminator (empty for `func.return`)."""
    return lower_ops(block.ops, ctx)


def lower_ops(ops: Iterable[Operation], ctx: LoweringContext) -> list[jax.Array]:
    """Evaluates `ops` in order in `ctx.env` (a block's, or a run of one, as a pipeline stage takes); returns the
    values of a terminator among them (empty without one, or for `func.return`)."""
    for op in ops:
        if isinstance(op, dsv3.YieldOp | ReturnOp):
            return [ctx.env[v] for v in op.operands]
        rule = LOWERINGS.get(type(op))
        if rule is None:
            raise LoweringError(f"no lowering registered for '{op.name}'")
        results = rule(op, [ctx.env[v] for v in op.operands], ctx)
        for value, result in zip(op.results, results, strict=True):
            ctx.env[value] = result
    return []


def lower_region_block(block: Block, args: Sequence[jax.Array], ctx: LoweringContext) -> list[jax.Array]:
    """Evaluates a nested block whose arguments are `args`, seeing the enclosing values too."""
    outer = ctx.env
    ctx.env = ChainMap(dict(zip(block.args, args, strict=True)), outer)
    try:
        return lower_block(block, ctx)
    finally:
        ctx.env = outer
