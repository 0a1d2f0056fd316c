"""The pipelined training step (`runtime/pipelined.py`) against the unpipelined one, on eight simulated CPU devices:
two training steps give the same metrics and the first one the same gradients (float32, to 1e-5 of each gradient's
largest entry), with sharding inside the stages.

A schedule compiles to one program of a branch per kind of unit (a minute of XLA on two cores for DualPipeV), so the
suite runs the schedule that has every kind, DualPipeV (overlapped pairs, split and whole backwards, weight-gradient
units, the V's turn on one rank, activations going both ways), with fsdp inside; `tests/test_pipeline_ticks.py`
replays every schedule's tables at 2, 4 and 8 ranks, and `benchmarks/pipeline_parity.py` runs the whole matrix (five
schedules, pipe=2 and 4, with and without fsdp/expert inside) and, with `--train`, whole training runs (50 steps of
1F1B give the unpipelined losses to 2e-6), which compile a pipelined training step: minutes each on two cores."""

import jax
import numpy as np
import pytest

import dsv3c
from dsv3c.frontend.errors import UserError
from dsv3c.runtime.stages import stage_layout

pytestmark = pytest.mark.usefixtures("unoptimized_cpu_code")

SPEC = "examples/tiny.dsv3"
BATCH, SEQ = 8, 16


def pipelined(schedule: str, mesh: dict[str, int], microbatches: int = 4, batch: int = BATCH):
    cut = f"ranks={mesh['pipe']} schedule={schedule} microbatches={microbatches} seq={SEQ}"
    devices = int(np.prod([*mesh.values()]))
    return dsv3c.prepare(SPEC, batch=batch, seq=SEQ, mesh=mesh, pipeline=f"dsv3-remat,dsv3-pipeline{{{cut}}}",
                         devices=devices)


def _two_steps(prog: dsv3c.Program, tokens: jax.Array) -> tuple[list[dict[str, float]], dict[str, jax.Array]]:
    """The metrics of two training steps on `tokens` from seed 0's state, and AdamW's first moment after the first:
    (1 - b1) times the clipped gradient, so the step's gradients can be compared through the optimizer's state."""
    state, steps = prog.init_state(0), []
    for step in range(2):
        state, metrics = prog.train_step(state, {"tokens": tokens})
        steps.append({name: float(metrics[name]) for name in ("loss", "lm_loss", "mtp_loss", "balance_loss")})
        if step == 0:
            adam = next(n for n in jax.tree.leaves(state["opt_state"], is_leaf=lambda n: hasattr(n, "mu"))
                        if hasattr(n, "mu"))
            moment = {name: np.asarray(value) for name, value in adam.mu.items()}
    return steps, moment


@pytest.fixture(scope="module")
def reference():
    """Two unpipelined training steps: their metrics and the first step's gradients, and the tokens."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 1), 0, 256)
    return tokens, *_two_steps(dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ), tokens)


@pytest.fixture(scope="module")
def dualpipev():
    """DualPipeV over pipe=2 with fsdp=2 inside the stages, the program both tests below use."""
    return pipelined("dualpipev", {"pipe": 2, "fsdp": 2})


def test_dualpipev_training_steps_equal_the_unpipelined_ones(reference, dualpipev):
    """The pipelined train step (the schedule's tables, gradient accumulation over micro-batches in the stage
    layout, the update on the staged state) against the unpipelined one: the same metrics in both steps, and the
    same gradients of the first (read off AdamW's first moment, to 1e-5 of each one's largest entry)."""
    tokens, expected, expected_moment = reference
    steps, moment = _two_steps(dualpipev, tokens)
    moment = stage_layout(dualpipev.module).unstage_params(moment)
    for step, (got, want) in enumerate(zip(steps, expected, strict=True)):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=f"step {step + 1} {name}")
    assert moment.keys() == expected_moment.keys()
    for name, want in expected_moment.items():
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(moment[name]), want, atol=1e-5 * scale, err_msg=name)


def test_stage_layout_holds_each_ranks_layers_and_converts_back(dualpipev):
    layout = stage_layout(dualpipev.module)
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(info.shape).astype(np.float32) for name, info in dualpipev.infos.items()}
    staged = jax.device_get(layout.stage_params(params))
    # tiny: 1 dense + 3 MoE layers over DualPipeV's 4 chunks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    (dense, moe) = layout.stacks
    assert (dense.layers, moe.layers) == ((1, 0, 0, 0), (0, 1, 1, 1))
    assert staged["moe.wq_a"].shape == (2, moe.rows, *params["moe.wq_a"].shape[1:])
    rank0_moe_rows = [staged["moe.wq_a"][0, moe.offset[k]] for k in (0, 1) if moe.layers[layout.chunk(0, k)]]
    np.testing.assert_array_equal(rank0_moe_rows[0], params["moe.wq_a"][2])  # chunk 3 runs the last MoE layer
    back = layout.unstage_params(staged)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_a_pipelined_module_needs_a_pipe_axis_and_whole_microbatches():
    passes = "dsv3-remat,dsv3-pipeline{ranks=2 schedule=1f1b microbatches=4}"
    with pytest.raises(UserError, match="add pipe=2 to the mesh"):
        dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ, mesh={"fsdp": 2}, pipeline=passes, devices=2)
    with pytest.raises(UserError, match="batch 6 does not divide into the pipeline's 4 micro-batches"):
        pipelined("1f1b", {"pipe": 2}, batch=6)
    with pytest.raises(UserError, match="a micro-batch of 1 sequences .* does not divide over the 2 devices"):
        pipelined("1f1b", {"pipe": 2, "fsdp": 2}, batch=4)
