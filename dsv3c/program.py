"""`dsv3c.compile` and the `Program` it returns.

The stages run in one direction: source -> IR -> passes -> JAX trace -> StableHLO -> XLA executable. Compilation
works on shapes alone (`jax.ShapeDtypeStruct`), so no parameter is allocated until `init_params`/`init_state` is
called, and a model of any size can be compiled and reported on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh
from xdsl.dialects.builtin import ModuleOp

from .dialects import dsv3
from .dialects.dsv3 import OutputRole
from .dialects.text import parse_ir_with_positions, print_ir, verify_ir
from .fp8 import check_fp8_option, fp8_mode, fp8_report
from .frontend.builder import build_ir
from .frontend.errors import DoesNotFitError, SpecError, UserError
from .frontend.limits import MAX_IR_BYTES
from .frontend.parser import load
from .frontend.source import read_source
from .frontend.spec import ModelSpec
from .layout import applicable_layout, layout_passes
from .memory_breakdown import describe, memory_breakdown
from .pipeline import parse_passes, pipeline_text, run_pipeline
from .pipeline_report import pipeline_report
from .report import attach_roofline, build_report, model_dims, model_flops
from .runtime.decode import Decoder, Generation, attention_flops, cache_infos, kv_cache_report
from .runtime.ema import EMA, device_shardings
from .runtime.host_memory import configure_jax
from .runtime.init import init_params
from .runtime.model import param_infos, run_model
from .runtime.optimizer import make_optimizer, optimizer_op
from .runtime.schedule import compiler_options
from .runtime.sharding import (
    batch_sharding,
    build_mesh,
    is_explicit,
    mesh_size,
    mesh_sizes,
    param_shardings,
    state_shardings,
)
from .runtime.stages import check_pipeline, stage_layout
from .runtime.train import TrainState, make_eval_step, make_loss_and_grads, make_train_step, split_params
from .runtime.xla import OutOfDeviceMemory, compile_with_buffers
from .targets import PipelineRequest, Target, resolve_target

configure_jax()  # before any program runs: see runtime/host_memory.py

MODES = ("train", "forward", "prefill", "decode")
Source = ModelSpec | ModuleOp | str | Path


Locator = Callable[[Exception], Exception]

# Where a logical axis's size is written in a spec, to point a sharding error at it.
_SPEC_FIELD = {
    "embed": "model.dim", "vocab": "model.vocab", "exp": "model.moe.experts", "q_lora": "model.attention.q_lora_rank",
    "kv_lora": "model.attention.kv_lora_rank", "q_heads": "model.attention.heads", "kv_heads": "model.attention.heads",
    "heads": "model.attention.heads", "activation_heads": "model.attention.heads",
}


def load_module(source: Source) -> ModuleOp:
    """IR for any accepted source: a spec, a module (cloned, never modified), or a `.dsv3`/`.mlir` path."""
    return load_module_located(source)[0]


def load_module_located(source: Source) -> tuple[ModuleOp, Locator]:
    """The IR and a function that turns a sharding or layout error into one positioned in the source: at the spec
    field that sets the offending size (or the error's `field`), or at the op in an IR file."""
    if isinstance(source, str | Path) and not isinstance(source, ModelSpec):
        path = Path(source)
        if not path.exists():
            raise UserError(f"no such file: {path}")
        if path.suffix == ".mlir":
            text = read_source(path, "IR file", MAX_IR_BYTES)
            module, positions = parse_ir_with_positions(text, str(path))
            return module, lambda err: SpecError(
                str(err), str(path), *positions.get(id(getattr(err, "op", None)), (0, 0))
            )
        source = load(path)
    if isinstance(source, ModuleOp):
        module = source.clone()
        verify_ir(module)
        return module, lambda err: UserError(str(err))
    spec = source

    def locate(err: Exception) -> Exception:
        logical = getattr(err, "logical", None)
        field = getattr(err, "field", None) or _SPEC_FIELD.get(logical or "")
        if logical == "mlp" and isinstance(getattr(err, "op", None), dsv3.ParamOp):
            field = "model.dense_ffn.hidden" if _feeds_dense_stack(err.op) else "model.moe.hidden"
        line, col = spec.positions.get(field or "", (0, 0))
        return SpecError(str(err), spec.path, line, col) if line else UserError(str(err))

    return build_ir(spec), locate


def _feeds_dense_stack(param: dsv3.ParamOp) -> bool:
    """Whether a parameter is a weight of a dense layer stack (its `mlp` width is the dense FFN's)."""
    return any(
        isinstance(use.operation, dsv3.LayerStackOp) and use.operation.layer_kind.data == "dense"
        for use in param.result.uses
    )


def _check_options(mode: str, batch: int, seq: int, shard_mode: str | None) -> None:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}' (expected one of {', '.join(MODES)})")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive (got batch {batch}, seq {seq})")
    if shard_mode not in (None, "auto", "explicit"):
        raise UserError(f"unknown shard mode '{shard_mode}' (expected auto or explicit)")


class Program:
    """A compiled dsv3 program: its IR after the passes, the dumps of every stage, the report, and the jitted
    functions to initialise, train and run it."""

    def __init__(
        self, module: ModuleOp, target: Target, devices: list[Any], mode: str, batch: int, seq: int, steps: int
    ):
        self.module = module
        self.target = target
        self.mode = mode
        self.batch = batch
        self.seq = seq
        self.devices = devices
        self.dumps: list[tuple[str, str]] = []
        self.pipeline = ""  # the passes that ran, with every option spelled out
        self.shard_mode = "auto"  # the sharding mode asked for (by the caller or the IR's layout)
        self.fp8_state = ("off", "")  # how FP8 GEMMs run, and why
        self.stablehlo = ""
        self.compiled_text = ""
        self.report: dict[str, Any] = {}
        self.infos = param_infos(module)
        self.total_steps = steps  # the run length the schedule decays over (decay_steps = 0); checkpoints record it
        self.explicit = is_explicit(module)
        self.stages = stage_layout(module)  # a pipelined module's training state holds its layers by stage
        if self.stages is not None and mode == "train":
            check_pipeline(self.stages, mesh_sizes(module), batch, self.explicit)
        self.state_shardings: TrainState | None = None  # set below for a program on a mesh
        self._param_shardings: dict[str, jax.sharding.Sharding] | None = None
        self._token_sharding: jax.sharding.Sharding | None = None
        # Ahead-of-time targets always need a mesh: it is what names the (topology) devices XLA compiles for.
        self.mesh = build_mesh(module, devices) or (None if target.local else Mesh(np.array(devices[:1]), ("data",)))
        self._optimizer = make_optimizer(module, self.infos, steps)
        step = make_train_step(module, self._optimizer, self.mesh, self.explicit)
        # The target's XLA options and the IR's (`dsv3.schedule`) for every program, jitted or compiled ahead of time:
        # a program run through `prepare` is compiled as `compile` would compile it.
        self.xla_options = {**target.xla_options, **compiler_options(module)}
        if self.stages is not None and target.platform == "gpu":
            # XLA:GPU's Triton GEMMs fail ahead of time on small dots in a pipelined chunk's transposed scan
            # ("Couldn't find output tile sizes"); cuBLAS runs them
            self.xla_options["xla_gpu_enable_triton_gemm"] = False
        jit = partial(jax.jit, compiler_options=self.xla_options or None)
        if self.mesh is None:
            self._init_params = jit(lambda seed: init_params(self.infos, seed))
            self._init_state = jit(self._state_from_seed)
            self._train_step = jit(step, donate_argnums=0)
            self._forward = jit(self._logits)
        else:
            params = param_shardings(module, self.mesh)
            staged = params if self.stages is None else {
                name: self.stages.staged_sharding(name, sharding) for name, sharding in params.items()}
            state = state_shardings(jax.eval_shape(self._state_from_seed, 0), staged, self.mesh)
            self.state_shardings = state  # where each leaf of a training state lives (to place restored values)
            tokens = batch_sharding(self.mesh, batch)
            self._param_shardings, self._token_sharding = params, tokens
            self._init_params = jit(lambda seed: init_params(self.infos, seed), out_shardings=params)
            self._init_state = jit(self._state_from_seed, out_shardings=state)
            placed = state
            if target.xla_lays_out_state and not target.local:
                placed = jax.tree.map(lambda sharding: Format(Layout.AUTO, sharding), state)
            self._train_step = jit(
                step, in_shardings=(placed, {"tokens": tokens}), out_shardings=(placed, None), donate_argnums=0
            )
            self._forward = jit(self._logits, in_shardings=(params, tokens))
        self._loss_and_grads = jit(make_loss_and_grads(module, self.mesh, self.explicit))
        self._eval_step = jit(make_eval_step(module, self.mesh, self.explicit))
        decay = optimizer_op(module).opt_float_prop("ema_decay") if mode == "train" else None
        self.ema: EMA | None = None  # the parameters' moving average, when the IR's optimizer asks for one
        if decay is not None and target.local:
            trainable = self.state_shardings["params"] if self.state_shardings is not None else None
            self.ema = EMA(decay, device_shardings(self.abstract_state()["params"], trainable))
        self._compiled: Any = None  # compile()'s executable, reused by train_step/forward at the compiled shapes
        # After `dsv3-kv-cache`, @model is one cached inference step: forward, lowering and generation go through
        # the decode runtime.
        self._decoder = Decoder(module, self.mesh, self.explicit) if cache_infos(module) else None
        if mode == "decode" and self._decoder is None:
            raise UserError("mode 'decode' needs the dsv3-kv-cache pass (the default decode pipeline runs it)")

    def _on_mesh(self):
        """Explicit-axis sharding needs the mesh set while tracing and running."""
        return jax.set_mesh(self.mesh) if self.explicit and self.mesh is not None else contextlib.nullcontext()

    # -- pure functions that get jitted --------------------------------------------------------------------------

    def _state_from_seed(self, seed) -> TrainState:
        params = init_params(self.infos, seed)
        if self.stages is not None:
            params = self.stages.stage_params(params)
        state = split_params(self.infos, params)
        state["opt_state"] = self._optimizer.init(state["params"])
        state["step"] = jnp.zeros((), jnp.int32)
        return state

    def _logits(self, params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
        padded = jnp.pad(tokens, ((0, 0), (0, 1)))  # the model reads [B, S+1]: inputs plus one label column
        return run_model(self.module, params, padded, self.mesh, self.explicit).of_role(OutputRole.LOGITS)

    # -- abstract shapes -----------------------------------------------------------------------------------------

    # On a mesh the shapes carry their shardings: under explicit axes a shape without one is traced as replicated,
    # so the program would gather every weight whole (and jit's in_shardings would only reshard at its entry).

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self._state_from_seed, 0)
        if self.state_shardings is None:
            return shapes
        return jax.tree.map(_with_sharding, shapes, self.state_shardings)

    def restore_shardings(self) -> TrainState:
        """Where each leaf of a training state goes when a checkpoint is restored into this program: its mesh's
        shardings, or the first device without a mesh."""
        if self.state_shardings is not None:
            return self.state_shardings
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, self.abstract_state())

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = {name: jax.ShapeDtypeStruct(i.shape, i.dtype) for name, i in self.infos.items()}
        if self._param_shardings is None:
            return shapes
        return jax.tree.map(_with_sharding, shapes, self._param_shardings)

    def _abstract_tokens(self, length: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.batch, length), jnp.int32, sharding=self._token_sharding)

    def lower(self):
        """Lowers the program's main function (train step or forward) from shapes alone."""
        with self._on_mesh():
            if self._decoder is not None:  # prefill: S = seq; decode: one token over a cache of seq
                return self._decoder.lower(self.abstract_params(), self.batch, self.seq, self.mode)
            if self.mode == "train":
                return self._train_step.lower(self.abstract_state(), {"tokens": self._abstract_tokens(self.seq + 1)})
            return self._forward.lower(self.abstract_params(), self._abstract_tokens(self.seq))

    # -- public API ----------------------------------------------------------------------------------------------

    def _require_local(self, what: str) -> None:
        if not self.target.local:
            raise UserError(f"{what} needs the target's hardware; '{self.target.name}' was compiled ahead of time")

    def init_params(self, seed: int = 0) -> dict[str, jax.Array]:
        """All parameters (router biases included), initialised as the IR declares."""
        self._require_local("init_params")
        with self._on_mesh():
            return self._init_params(seed)

    def init_state(self, seed: int = 0) -> TrainState:
        """Trainable params, router biases, optimizer state and step counter."""
        self._require_local("init_state")
        with self._on_mesh():
            return self._init_state(seed)

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on `batch["tokens"]` int32[B, S+1]. The state is donated: use the returned one."""
        if self.mode != "train":
            raise UserError(f"train_step needs a program compiled with mode='train' (this one is '{self.mode}')")
        self._require_local("train_step")
        tokens = self._global_batch(batch["tokens"])
        with self._on_mesh():
            if self._compiled is not None and tokens.shape == (self.batch, self.seq + 1):
                return self._compiled(state, {"tokens": tokens})
            return self._train_step(state, {"tokens": tokens})

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The scalar losses ("loss", "lm_loss", ...) of the model on `batch["tokens"]` int32[B, S+1], without a
        gradient or an update: held-out evaluation."""
        tokens = self._global_batch(batch["tokens"])
        with self._on_mesh():
            return self._eval_step(state, tokens)

    def _global_batch(self, tokens: Any) -> jax.Array:
        """The token batch as one array over the mesh. Across processes (jax.distributed), every process holds
        either the whole global batch (the synthetic and `.npy` streams are deterministic) and contributes the rows
        its devices own, or only its own rows, batch / processes of them (a sharded Grain stream)."""
        if self.mesh is None or jax.process_count() == 1:
            return jnp.asarray(tokens)
        host = np.asarray(tokens)
        if host.shape[0] * jax.process_count() == self.batch:
            sharding = batch_sharding(self.mesh, self.batch)
            return jax.make_array_from_process_local_data(sharding, host, (self.batch, *host.shape[1:]))
        sharding = batch_sharding(self.mesh, host.shape[0])
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def loss_and_grads(
        self, state: TrainState, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Metrics and the gradient of the training loss for each trainable parameter, without an update (to
        compare layouts, precisions or recompute policies); laid out like the parameters."""
        with self._on_mesh():
            return self._loss_and_grads(state, batch["tokens"])

    def forward(self, params: dict[str, jax.Array] | TrainState, tokens: jax.Array) -> jax.Array:
        """float32 logits [B, S, vocab] for int32 tokens [B, S]. Accepts a parameter dict or a training state."""
        self._require_local("forward")
        if "params" in params and "router_bias" in params:
            params = {**params["params"], **params["router_bias"]}
            if self.stages is not None:
                params = self.stages.unstage_params(params)
        with self._on_mesh():
            if self._decoder is not None:
                return self._decoder.forward(params, tokens)
            tokens = jnp.asarray(tokens, jnp.int32)
            if self._compiled is not None and self._matches_compiled(params, tokens):
                return self._compiled(params, tokens)
            return self._forward(params, tokens)

    def _matches_compiled(self, params: dict[str, Any], tokens: jax.Array) -> bool:
        """Whether a forward call can run compile()'s executable: one device, and the shapes and dtypes it was
        compiled for (anything else is jitted anew)."""
        if self.mode != "forward" or self.mesh is not None or params.keys() != self.infos.keys():
            return False
        if tokens.shape != (self.batch, self.seq):
            return False
        return all((params[n].shape, params[n].dtype) == (i.shape, i.dtype) for n, i in self.infos.items())

    def generate(
        self,
        params: dict[str, Any],
        prompt_ids: Any,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        eos_id: int | None = None,
        return_logits: bool = False,
        speculative: bool = False,
    ) -> np.ndarray | Generation:
        """Continues each prompt (a list of token ids, or a list of such lists of any lengths) by `max_new_tokens`
        tokens with the latent (or, without `dsv3-mla-absorb`, naive) KV cache: greedy at temperature 0, sampled
        otherwise. `speculative` drafts with the MTP module (compile with `dsv3-mtp-draft` in the pipeline).
        Returns int32 [B, max_new_tokens], or a `Generation` (logits, draft acceptance) when `return_logits` or
        `speculative`."""
        self._require_local("generate")
        if self._decoder is None:
            raise UserError(f"generate needs a program compiled with mode='decode' (this one is '{self.mode}')")
        with self._on_mesh():
            out = self._decoder.generate(params, prompt_ids, max_new_tokens, temperature, seed, eos_id,
                                         return_logits=return_logits, speculative=speculative)
        return out if return_logits or speculative else out.tokens


def _with_sharding(shape: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def prepare(
    source: Source,
    target: str = "cpu",
    mode: str = "train",
    batch: int = 8,
    seq: int = 128,
    mesh: dict[str, int] | None = None,
    shard_mode: str | None = None,
    pipeline: str | None = "default",
    steps: int = 1000,
    log: Callable[[str], None] | None = None,
    devices: int | None = None,
    rules: str = "",
    fp8: str | None = None,
) -> Program:
    """Everything `compile` does before lowering: options checked, IR built, the target's passes run and dumped.
    The returned Program's functions are jitted when first called, and it has no report: for scripts (and tests)
    that call `loss_and_grads`, `init_params` or `forward` and do not need the ahead-of-time executable."""
    prog, _ = _prepare(source, target, mode, batch, seq, mesh, shard_mode, pipeline, steps, log or _quiet, devices,
                       rules, fp8)
    return prog


def _quiet(_message: str) -> None:
    pass


def _prepare(
    source: Source, target: str, mode: str, batch: int, seq: int, mesh: dict[str, int] | None,
    shard_mode: str | None, pipeline: str | None, steps: int, say: Callable[[str], None], devices: int | None,
    rules: str, fp8: str | None,
) -> tuple[Program, dict[str, float]]:
    seconds: dict[str, float] = {}
    _check_options(mode, batch, seq, shard_mode)
    fp8 = check_fp8_option(fp8)
    tgt = resolve_target(target)
    tgt.fp8_backend(fp8)  # refuses an FP8 request the target cannot serve, before any work

    clock = time.perf_counter()
    module, locate = load_module_located(source)
    dumps = [("input", print_ir(module))]
    seconds["parse"] = time.perf_counter() - clock
    say(f"parsed and built IR ({seconds['parse']:.2f}s)")

    # The IR's declared layout fills what the caller left open; without one, a multi-chip target is FSDP over all.
    layout = applicable_layout(module, tgt, devices, locate, say)
    if layout is not None:
        mesh = mesh if mesh is not None else layout.sizes
        shard_mode = shard_mode or layout.mode.data
    shard_mode = shard_mode or "auto"
    chips = tgt.chips or devices or 1
    if mesh is None and chips > 1:
        mesh = {"fsdp": chips}

    clock = time.perf_counter()
    if pipeline != "default":
        base = parse_passes(pipeline or "")
    elif layout is not None and mode == "train":
        base = layout_passes(layout, tgt.default_passes(mode))
    else:
        base = tgt.default_passes(mode)
    request = PipelineRequest(fp8=fp8, mesh=dict(mesh or {}), shard_mode=shard_mode, rules=rules)
    passes = tgt.pipeline(base, mode, request)
    spec = pipeline_text(passes)
    dumps += run_pipeline(module, passes, locate)
    seconds["passes"] = time.perf_counter() - clock
    say(f"ran passes [{spec or 'none'}] ({seconds['passes']:.2f}s)")
    tgt.check_lowerable(module, locate)
    fp8_state, fp8_why = fp8_mode(module, fp8)
    if fp8_state != "off":
        say(f"FP8 GEMMs: {fp8_state} ({fp8_why})")

    device_list = tgt.devices(tgt.device_count(mesh_size(module)))
    prog = Program(module, tgt, device_list, mode, batch, seq, steps)
    prog.dumps = dumps
    prog.pipeline = spec
    prog.shard_mode = shard_mode
    prog.fp8_state = (fp8_state, fp8_why)
    return prog, seconds


def compile(
    source: Source,
    target: str = "cpu",
    mode: str = "train",
    batch: int = 8,
    seq: int = 128,
    mesh: dict[str, int] | None = None,
    shard_mode: str | None = None,
    pipeline: str | None = "default",
    steps: int = 1000,
    log: Callable[[str], None] | None = None,
    devices: int | None = None,
    rules: str = "",
    fp8: str | None = None,
    memory_breakdown: bool | None = None,
) -> Program:
    """Compiles a spec, spec path, IR path or IR module for `target`.

    `pipeline` is `default` (the mode's default passes), a `-p` style pass list, or None/"" for no passes. A `mesh`
    ({"fsdp": 4, "tensor": 2}) adds the shard pass with `shard_mode` (None: `auto`) and `rules`; without one, a
    multi-chip target (or `devices` > 1 on cpu) is sharded FSDP over all its chips. A layout the IR declares (a
    spec's `parallel` block) supplies the mesh, the shard mode and, to train, the default pipeline's recompute and
    head-loss passes wherever these arguments leave them open (`dsv3c/layout.py`). `steps` is the run length the
    learning-rate schedule decays over when the IR's `decay_steps` is 0. `fp8` (`native` or `emulate`) adds
    `dsv3-fp8-quant`; FP8 ops run natively where the target has FP8 hardware, are emulated on the CPU or when asked,
    and are refused otherwise (see `dsv3c/fp8.py`). A train step's report gets `memory_breakdown` when asked, and by
    default for a target compiled ahead of time (reading XLA's buffer assignment means having XLA dump it: a few
    seconds that a program compiled to run here does not need)."""
    say = log or _quiet
    prog, seconds = _prepare(source, target, mode, batch, seq, mesh, shard_mode, pipeline, steps, say, devices,
                             rules, fp8)
    tgt, device_list, module = prog.target, prog.devices, prog.module
    dumps, spec = prog.dumps, prog.pipeline
    fp8_state, fp8_why = prog.fp8_state
    clock = time.perf_counter()
    lowered = prog.lower()
    prog.stablehlo = lowered.as_text()
    seconds["lower"] = time.perf_counter() - clock
    say(f"lowered to StableHLO ({seconds['lower']:.2f}s)")

    clock = time.perf_counter()
    try:
        options = prog.xla_options
        breakdown = mode == "train" and (not tgt.local if memory_breakdown is None else memory_breakdown)
        compiled, prog.compiled_text, buffers = compile_with_buffers(lowered, options, tgt.platform, breakdown)
    except OutOfDeviceMemory as err:
        where = _where_memory_went(err, module)
        raise DoesNotFitError(
            f"the {mode} step does not fit on {tgt.name} ({len(device_list)} devices): {err.detail}"
            f"{f' The temporaries {where}.' if where else ''} Use more chips, shard more (--mesh), or recompute more "
            "(dsv3-remat{policy=full})", err.detail, where,
        ) from None
    seconds["compile"] = time.perf_counter() - clock
    say(f"compiled with XLA for {tgt.name} on {len(device_list)} device(s) ({seconds['compile']:.2f}s)")
    if mode in ("train", "forward") and tgt.local and prog._decoder is None:
        prog._compiled = compiled

    prog.dumps = [*dumps, ("stablehlo", prog.stablehlo), ("compiled", prog.compiled_text)]
    prog.report = build_report(
        module, compiled, prog.compiled_text, tgt, len(device_list), mode=mode, batch=batch, seq=seq,
        shard_mode=prog.shard_mode, pipeline=spec, compile_seconds=seconds, buffers=buffers,
    )
    if prog._decoder is not None:
        # one step: `seq` new tokens (prefill) or one (decode) attending over a cache of `seq` tokens
        new_tokens = 1 if mode == "decode" else seq
        r = prog.report
        r["flops_per_step"] = model_flops(module, batch, new_tokens, train=False) + attention_flops(
            module, batch, new_tokens, seq
        )
        attach_roofline(r, tgt.chip, train=False)
        r.update(kv_cache_report(module))
    if prog.stages is not None and mode == "train":
        # CONTRACT.md: `pipeline` is then the schedule's section (the passes stay in `passes`)
        prog.report["pipeline"] = pipeline_report(prog.stages, batch, seq)
    prog.report["xla_options"] = options
    if breakdown and "memory_breakdown" not in prog.report:
        prog.report["warnings"].append(
            "no memory_breakdown: XLA wrote no buffer assignment (the executable came from JAX's compilation cache)"
        )
    prog.report["fp8"] = fp8_report(module, fp8_state, fp8_why, prog.compiled_text)
    for warning in prog.report.get("warnings", []):
        say(f"warning: {warning}")
    return prog

def _where_memory_went(err: OutOfDeviceMemory, module: ModuleOp) -> str:
    """'at the peak (phase) in GiB: parts' when XLA left a buffer dump behind, so that a refused layout says what to
    cut; '' otherwise."""
    if err.buffers is None:
        return ""
    breakdown = memory_breakdown(err.buffers, err.hlo_text, *model_dims(module))
    return describe(breakdown) if breakdown is not None else ""


def write_dumps(dumps: list[tuple[str, str]], directory: str | Path) -> list[Path]:
    """Writes `NN-<stage>.mlir` files (`NN-compiled.hlo.txt` for XLA's output), each atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (stage, text) in enumerate(dumps):
        suffix = ".hlo.txt" if stage == "compiled" else ".mlir"
        path = out / f"{index:02d}-{stage}{suffix}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths
