"""The memory breakdown read off XLA's dumps: a hand-made dump whose peak and parts are worked out by hand, and a real
compile whose parts add up to XLA's own temp figure."""

from __future__ import annotations

import importlib.util

import pytest

from dsv3c.memory_breakdown import PARTS, memory_breakdown
from dsv3c.runtime.xla import BufferDump

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

# A step with a vocabulary of 50. The forward makes an activation and the logits, the backward (a loop) gathers a
# weight, makes a gradient of the weight's shape and a scratch value in its body, the optimizer makes an update.
HLO = """HloModule jit_step

%body.1 (p.1: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %scratch.1 = f32[8,8]{1,0} fusion(%p.1), kind=kLoop, calls=%fused.1
  ROOT %tuple.1 = (s32[], f32[4,8]{1,0}) tuple(%p.1, %scratch.1)
}

ENTRY %main.1 (w.1: f32[4,8]) -> f32[4,8] {
  %w.1 = f32[4,8]{1,0} parameter(0)
  %act.1 = f32[16,32]{1,0} fusion(%w.1), kind=kLoop, calls=%fused.2, metadata={op_name="jit(step)/jvp()/dot_general"}
  %logits.1 = f32[16,50]{1,0} fusion(%act.1), kind=kLoop, calls=%fused.3, metadata={op_name="jit(step)/jvp()/dot"}
  %all-gather.1 = f32[8,8]{1,0} all-gather(%w.1), dimensions={0}, metadata={op_name="jit(step)/transpose(jvp())/x"}
  %grad.1 = f32[4,8]{1,0} fusion(%all-gather.1), calls=%fused.4, metadata={op_name="jit(step)/transpose(jvp())/dot"}
  %while.1 = (s32[], f32[4,8]) while(%grad.1), condition=%c.1, body=%body.1, metadata={op_name="transpose(jvp())/while"}
  ROOT %update.1 = f32[4,8] fusion(%while.1), calls=%fused.5, metadata={op_name="jit(step)/optimizer/mul"}
}
"""

# Temp offsets: act [0, 2048), logits [2048, 5248), all-gather [5248, 5504), grad [5504, 5632) shared with the loop's
# carried value (an alias), scratch [5632, 5888); the update later reuses [0, 128). Colour 1 is another memory space.
ASSIGNMENT = """BufferAssignment:
allocation 0: size 128, parameter 0, shape |f32[4,8]| at ShapeIndex {}:
 value: <1 w.1 @0> (size=128,offset=0): f32[4,8]{1,0}
allocation 1: size 4096, color 1, preallocated-temp:
 value: <2 act.1 @0> (size=4096,offset=0): f32[16,64]{1,0}
allocation 2: size 5888, preallocated-temp:
 value: <3 act.1 @0> (size=2048,offset=0): f32[16,32]{1,0}
 value: <4 logits.1 @0> (size=3200,offset=2048): f32[16,50]{1,0}
 value: <5 all-gather.1 @0> (size=256,offset=5248): f32[8,8]{1,0}
 value: <6 grad.1 @0> (size=128,offset=5504): f32[4,8]{1,0}
 value: <7 while.1{1} @0> (size=128,offset=5504): f32[4,8]{1,0}
 value: <8 scratch.1 @0> (size=256,offset=5632): f32[8,8]{1,0}
 value: <9 update.1 @0> (size=128,offset=0): f32[4,8]{1,0}
"""

LIVE_RANGES = """HloLiveRange (max 9):
  InstructionSequence:
    0:w.1
    1:act.1
    2:logits.1
    3:all-gather.1
    4:grad.1
    5:while.1
    6:scratch.1
    7:tuple.1
    8:update.1
  BufferLiveRange:
    w.1{}:0-9
    act.1{}:1-6
    logits.1{}:2-6
    all-gather.1{}:3-6
    grad.1{}:4-5
    while.1{1}:5-8
    scratch.1{}:6-7
    update.1{}:8-9
"""


def test_the_peak_counts_aliases_once_and_names_each_buffers_part():
    """At position 6 act, logits, the all-gather, the loop's carried gradient and the loop's scratch are live:
    2048 + 3200 + 256 + 128 + 256 = 5888 bytes, the most at any position (5 has no scratch yet, 8 only the
    gradient and the update). grad.1 and while.1{1} are one buffer (same range) and count once."""
    breakdown = memory_breakdown(BufferDump(ASSIGNMENT, LIVE_RANGES), HLO, vocab=50, hidden=8)
    assert breakdown is not None
    assert breakdown.peak_instruction == "scratch.1" and breakdown.peak_phase == "backward"
    expected = dict.fromkeys(PARTS, 0) | {
        "logits": 3200,  # a vocabulary-sized dimension
        "gathered_weights": 256,  # an all-gather
        "gradients": 128,  # the weight's shape, made in the backward (the loop carries it)
        "saved_activations": 2048,  # made by the forward, live at a backward peak
        "layer_working_set": 256,  # made in the backward loop's body, where XLA left no name stack
    }
    assert breakdown.parts == expected
    assert sum(breakdown.parts.values()) == 5888  # the whole temp allocation: this packing has no fragmentation


# The output head [hidden 8, vocab 50] gathered whole by an all-reduce in the forward, its gradient all-reduced
# whole in the backward, and the logits between them: only the logits are `logits`.
HEAD_HLO = """HloModule jit_step

ENTRY %main.2 (w.2: f32[2,50]) -> f32[2,50] {
  %w.2 = f32[2,50]{1,0} parameter(0)
  %all-reduce.2 = f32[8,50]{1,0} all-reduce(%w.2), metadata={op_name="jit(step)/jvp()/convert_element_type"}
  %logits.2 = f32[16,50]{1,0} fusion(%all-reduce.2), calls=%fused.6, metadata={op_name="jit(step)/jvp()/dot"}
  %all-reduce.3 = f32[8,50]{1,0} all-reduce(%logits.2), metadata={op_name="jit(step)/transpose(jvp())/dot"}
  ROOT %update.2 = f32[2,50] fusion(%all-reduce.3), calls=%fused.7, metadata={op_name="jit(step)/optimizer/mul"}
}
"""

HEAD_ASSIGNMENT = """BufferAssignment:
allocation 0: size 6400, preallocated-temp:
 value: <1 all-reduce.2 @0> (size=1600,offset=0): f32[8,50]{1,0}
 value: <2 logits.2 @0> (size=3200,offset=1600): f32[16,50]{1,0}
 value: <3 all-reduce.3 @0> (size=1600,offset=4800): f32[8,50]{1,0}
"""

HEAD_LIVE_RANGES = """HloLiveRange (max 5):
  InstructionSequence:
    0:w.2
    1:all-reduce.2
    2:logits.2
    3:all-reduce.3
    4:update.2
  BufferLiveRange:
    all-reduce.2{}:1-3
    logits.2{}:2-3
    all-reduce.3{}:3-4
"""


def test_the_output_heads_weight_and_gradient_are_not_logits():
    """A [hidden, vocab] buffer is the head's weight, whichever collective made it: gathered in the forward, a
    gradient in the backward. (Counted as logits, the 671B step's 5.3 GiB of head weight and gradient hid where
    its memory went.)"""
    breakdown = memory_breakdown(BufferDump(HEAD_ASSIGNMENT, HEAD_LIVE_RANGES), HEAD_HLO, vocab=50, hidden=8)
    assert breakdown is not None and breakdown.peak_instruction == "all-reduce.3"
    assert breakdown.parts == dict.fromkeys(PARTS, 0) | {"logits": 3200, "gathered_weights": 1600, "gradients": 1600}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_program_over_hbm_says_what_filled_it():
    """XLA:TPU refuses a program whose temporaries exceed a v5p chip's 95 GiB, after it has assigned the buffers:
    the refusal carries XLA's dump, and the breakdown finds the buffer that did it (a 100 GiB f32 outer product
    that the sort must hold whole)."""
    import jax
    import jax.numpy as jnp

    from dsv3c.runtime.xla import OutOfDeviceMemory, compile_with_buffers
    from dsv3c.targets import resolve_target

    n = 160_000  # n * n f32 values: 102 GB
    device = resolve_target("tpu-v5p-8").devices(1)[0]
    x = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    lowered = jax.jit(lambda v: jnp.sort(jnp.outer(v, v), axis=0)[0]).lower(x)
    with pytest.raises(OutOfDeviceMemory) as refused:
        compile_with_buffers(lowered, {}, "tpu", buffers=False)
    assert "HBM" in refused.value.detail and refused.value.buffers is not None
    breakdown = memory_breakdown(refused.value.buffers, refused.value.hlo_text, vocab=0, hidden=0)
    assert breakdown is not None and sum(breakdown.parts.values()) >= n * n * 4


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_target_keeps_each_layers_weight_cast_inside_the_scan():
    """A scan of 16 layers whose f32 weights are cast to bf16 for their GEMMs, trained FSDP over a v5p-8 slice.
    With XLA:TPU's default options, bf16 propagation narrows the loop's weights and converts every layer's weights
    at once before the loop: a bf16 copy of the whole stack, live through forward and backward (`weight_copies`).
    The TPU target's options keep the cast per layer, and the step's temporaries shrink by about that copy."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dsv3c.runtime.xla import compile_with_buffers
    from dsv3c.targets import TpuTarget, resolve_target

    layers, dim, hidden = 16, 1024, 4096
    mesh = Mesh(resolve_target("tpu-v5p-8").devices(4), ("fsdp",))

    def loss(weights, x):
        def layer(h, w):
            up, down = (m.astype(jnp.bfloat16) for m in w)
            return h + jax.nn.relu(h @ up) @ down, None

        h, _ = jax.lax.scan(jax.checkpoint(layer), x, weights)
        return jnp.sum(jnp.square(h.astype(jnp.float32)))

    def step(weights, x):
        grads = jax.grad(loss)(weights, x)
        return jax.tree.map(lambda w, g: w - 1e-3 * g.astype(w.dtype), weights, grads)

    shard = NamedSharding(mesh, PartitionSpec(None, "fsdp", None))
    weights = (jax.ShapeDtypeStruct((layers, dim, hidden), jnp.float32, sharding=shard),
               jax.ShapeDtypeStruct((layers, hidden, dim), jnp.float32, sharding=shard))
    x = jax.ShapeDtypeStruct((4, 1024, dim), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    lowered = jax.jit(step, donate_argnums=0).lower(weights, x)
    stack_copy = 2 * layers * dim * hidden // 4 * 2  # both stacks' per-device shards in bf16: 32 MiB
    results = {}
    for name, options in (("xla default", {}), ("target", TpuTarget.xla_options)):
        compiled, text, buffers = compile_with_buffers(lowered, dict(options), "tpu", buffers=True)
        breakdown = memory_breakdown(buffers, text, vocab=0, hidden=0)
        results[name] = (compiled.memory_analysis().temp_size_in_bytes, breakdown.parts["weight_copies"])
    assert results["xla default"][1] >= stack_copy, results  # the failure mode this guards against is real
    assert results["target"][1] == 0, results
    assert results["target"][0] <= results["xla default"][0] - stack_copy, results


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_target_lets_xla_lay_out_the_training_state():
    """The TPU target's train step takes every leaf of its state in the layout XLA chooses (`layout_mode = "auto"`
    on each state argument of the lowered step), so that XLA stores a stacked weight the way its GEMMs and gathers
    read it instead of copying the whole stack each step (deepseek3-test / v5p-8: 3.1 GiB of copies gone,
    `benchmarks/RESULTS.md`); the CPU, which runs its programs here, keeps row-major arrays."""
    from pathlib import Path

    import jax

    import dsv3c
    from dsv3c.targets import TpuTarget

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny.dsv3"
    tpu = dsv3c.prepare(str(tiny), target="tpu-v5p-8", batch=4, seq=16)
    cpu = dsv3c.prepare(str(tiny), target="cpu", batch=4, seq=16)
    state_leaves = len(jax.tree.leaves(tpu.abstract_state()))
    assert TpuTarget.xla_lays_out_state
    assert tpu.lower().as_text().count('mhlo.layout_mode = "auto"') == 2 * state_leaves  # the state in and out
    assert 'mhlo.layout_mode = "auto"' not in cpu.lower().as_text()
