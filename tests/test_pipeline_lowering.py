"""The pipelined training step (`runtime/pipelined.py`) against the unpipelined one, on eight simulated CPU devices:
the same loss, metrics and gradients (float32, to 1e-5 of each gradient's largest entry), with sharding inside the
stages, and the same losses over 50 training steps.

A schedule compiles to one program of a branch per kind of unit (a minute of XLA on two cores for DualPipeV), so the
suite runs the schedule that has every kind, DualPipeV (overlapped pairs, split and whole backwards, weight-gradient
units, the V's turn on one rank, activations going both ways), with fsdp inside, and trains with 1F1B;
`tests/test_pipeline_ticks.py` replays every schedule's tables at 2, 4 and 8 ranks, and `benchmarks/pipeline_parity.py`
runs the whole matrix (five schedules, pipe=2 and 4, with and without fsdp/expert inside)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3c
from dsv3c.frontend.errors import UserError
from dsv3c.runtime.data import SyntheticStream
from dsv3c.runtime.stages import stage_layout

SPEC = "examples/tiny.dsv3"
BATCH, SEQ = 8, 16


def pipelined(schedule: str, mesh: dict[str, int], microbatches: int = 4, batch: int = BATCH):
    cut = f"ranks={mesh['pipe']} schedule={schedule} microbatches={microbatches} seq={SEQ}"
    devices = int(np.prod([*mesh.values()]))
    return dsv3c.prepare(SPEC, batch=batch, seq=SEQ, mesh=mesh, pipeline=f"dsv3-remat,dsv3-pipeline{{{cut}}}",
                         devices=devices)


@pytest.fixture(scope="module")
def reference():
    """The unpipelined step's metrics and gradients, and the state and tokens they were taken at."""
    prog = dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ)
    state = prog.init_state(0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 1), 0, 256)
    metrics, grads = prog.loss_and_grads(state, {"tokens": tokens})
    return tokens, metrics, grads


def test_dualpipev_gradients_equal_the_unpipelined_step(reference):
    tokens, expected, expected_grads = reference
    prog = pipelined("dualpipev", {"pipe": 2, "fsdp": 2})
    layout = stage_layout(prog.module)
    metrics, grads = prog.loss_and_grads(prog.init_state(0), {"tokens": tokens})
    grads = layout.unstage_params(grads)
    for name in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
        np.testing.assert_allclose(float(metrics[name]), float(expected[name]), rtol=1e-5, err_msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, want in expected_grads.items():
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(want), atol=1e-5 * scale, err_msg=name)


def test_stage_layout_holds_each_ranks_layers_and_converts_back():
    prog = pipelined("dualpipev", {"pipe": 2})
    layout = stage_layout(prog.module)
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(info.shape).astype(np.float32) for name, info in prog.infos.items()}
    staged = layout.stage_params(params)
    # tiny: 1 dense + 3 MoE layers over DualPipeV's 4 chunks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    (dense, moe) = layout.stacks
    assert (dense.layers, moe.layers) == ((1, 0, 0, 0), (0, 1, 1, 1))
    assert staged["moe.wq_a"].shape == (2, moe.rows, *params["moe.wq_a"].shape[1:])
    rank0_moe_rows = [staged["moe.wq_a"][0, moe.offset[k]] for k in (0, 1) if moe.layers[layout.chunk(0, k)]]
    np.testing.assert_array_equal(rank0_moe_rows[0], params["moe.wq_a"][2])  # chunk 3 runs the last MoE layer
    back = layout.unstage_params(staged)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_fifty_training_steps_give_the_unpipelined_losses():
    """`tiny` at a learning rate of 1e-3: the two runs agree to 2e-6 at every step. At tiny's own 1e-2 they agree
    to 1e-6 for 15 steps, until a router's top-k decision between two nearly equal experts goes the other way, and
    from then on drift apart by up to 1%, as any two orders of float additions would."""
    steps, seq = 50, 32
    spec = dsv3c.parse(open(SPEC).read().replace("lr 1e-2", "lr 1e-3"))
    stream = SyntheticStream(256, seed=2)
    cut = f"dsv3-remat,dsv3-pipeline{{ranks=2 schedule=1f1b microbatches=4 seq={seq}}}"
    losses = {}
    for label, options in (("plain", {}), ("1f1b", {"mesh": {"pipe": 2}, "devices": 2, "pipeline": cut})):
        prog = dsv3c.prepare(spec, batch=BATCH, seq=seq, steps=steps, **options)
        state, curve = prog.init_state(0), []
        for step in range(steps):
            state, metrics = prog.train_step(state, {"tokens": stream.batch(step, BATCH, seq + 1)})
            curve.append(float(metrics["loss"]))
        losses[label] = np.array(curve)
    assert losses["plain"][-5:].mean() < losses["plain"][:5].mean() - 0.05  # it learns
    np.testing.assert_allclose(losses["1f1b"], losses["plain"], rtol=1e-5)


def test_a_pipelined_module_needs_a_pipe_axis_and_whole_microbatches():
    passes = "dsv3-remat,dsv3-pipeline{ranks=2 schedule=1f1b microbatches=4}"
    with pytest.raises(UserError, match="add pipe=2 to the mesh"):
        dsv3c.prepare(SPEC, batch=BATCH, seq=SEQ, mesh={"fsdp": 2}, pipeline=passes, devices=2)
    with pytest.raises(UserError, match="batch 6 does not divide into the pipeline's 4 micro-batches"):
        pipelined("1f1b", {"pipe": 2}, batch=6)
    with pytest.raises(UserError, match="a micro-batch of 1 sequences .* does not divide over the 2 devices"):
        pipelined("1f1b", {"pipe": 2, "fsdp": 2}, batch=4)
