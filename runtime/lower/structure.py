"""Lowering of the structural ops: parameters, the layer stack (as `lax.scan`), outputs and bias updates."""

from __future__ import annotations

import jax
from jax import lax

from ...dialects import dsv3
from .registry import LoweringContext, LoweringError, Output, lower_region_block, register_lowering
from .remat import remat_policy


@register_lowering(dsv3.ParamOp)
def _param(op: dsv3.ParamOp, args, ctx: LoweringContext):
    try:
        value = ctx.params[op.pname]
    except KeyError:
        raise LoweringError(f"parameter '{op.pname}' was not provided") from None
    return [value]


@register_lowering(dsv3.LayerStackOp)
def _layer_stack(op: dsv3.LayerStackOp, args, ctx: LoweringContext):
    """One `lax.scan` over the stacked parameters: the region is traced once, whatever the layer count. A stack with
    a `remat` policy scans a `jax.checkpoint`ed layer, so backward keeps only the values the layer's tags save."""
    block = op.body.block

    def layer(hidden: jax.Array, layer_params: tuple[jax.Array, ...]):
        hidden_out, *per_layer = lower_region_block(block, [hidden, *layer_params], ctx)
        return hidden_out, tuple(per_layer)

    if op.remat is not None and op.remat.data != "none":
        # prevent_cse=False: the scan's loop already keeps XLA from merging the recomputation back into the forward
        # pass (JAX's advice for checkpoint under scan), and the barriers it would add cost fusion.
        kernels = [] if op.kernel_residuals is None else [k.data for k in op.kernel_residuals.data]
        layer = jax.checkpoint(layer, policy=remat_policy(block, kernels), prevent_cse=False)
    hidden, stacked_outputs = lax.scan(layer, args[0], tuple(args[1:]))
    return [hidden, *stacked_outputs]


@register_lowering(dsv3.OutputOp)
def _output(op: dsv3.OutputOp, args, ctx: LoweringContext):
    weight = None if op.weight is None else op.weight.value.data
    ctx.outputs.append(Output(op.output_name.data, op.output_role, args[0], weight))
    return []


@register_lowering(dsv3.BiasUpdateOp)
def _bias_update(op: dsv3.BiasUpdateOp, args, ctx: LoweringContext):
    ctx.bias_updates.append((op.param.data, args[0], op.rate.value.data))
    return []
