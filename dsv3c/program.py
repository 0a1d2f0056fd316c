"""`dsv3c.compile` and the `Program` it returns.

The stages run in one direction: source -> IR -> passes -> JAX trace -> StableHLO -> XLA executable. Compilation
works on shapes alone (`jax.ShapeDtypeStruct`), so no parameter is allocated until `init_params`/`init_state` is
called, and a model of any size can be compiled and reported on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from xdsl.dialects.builtin import ModuleOp

from .dialects.text import parse_ir, print_ir, verify_ir
from .frontend.builder import build_ir
from .frontend.errors import UserError
from .frontend.parser import load
from .frontend.spec import ModelSpec
from .pipeline import default_pipeline, run_pipeline
from .report import collectives, count_params, flops, memory_report, model_flops
from .runtime.init import init_params
from .runtime.model import param_infos, run_model
from .runtime.optimizer import make_optimizer
from .runtime.train import TrainState, make_train_step, split_params
from .targets import Target, resolve_target

MODES = ("train", "forward", "prefill", "decode")
Source = ModelSpec | ModuleOp | str | Path


def load_module(source: Source) -> ModuleOp:
    """IR for any accepted source: a spec, a module (cloned, never modified), or a `.dsv3`/`.mlir` path."""
    if isinstance(source, ModelSpec):
        return build_ir(source)
    if isinstance(source, ModuleOp):
        module = source.clone()
        verify_ir(module)
        return module
    path = Path(source)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.suffix == ".mlir":
        return parse_ir(path.read_text(), str(path))
    return build_ir(load(path))


def _check_options(mode: str, batch: int, seq: int, mesh: Any, shard_mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}' (expected one of {', '.join(MODES)})")
    if mode == "decode":
        raise UserError("mode 'decode' needs the latent KV-cache runtime, which this version does not have yet")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive (got batch {batch}, seq {seq})")
    if shard_mode not in ("auto", "explicit"):
        raise UserError(f"unknown shard mode '{shard_mode}' (expected auto or explicit)")
    if mesh and any(size != 1 for size in dict(mesh).values()):
        raise UserError("sharded meshes are not supported yet: this version compiles for one device")


class Program:
    """A compiled dsv3 program: its IR after the passes, the dumps of every stage, the report, and the jitted
    functions to initialise, train and run it."""

    def __init__(self, module: ModuleOp, target: Target, mode: str, batch: int, seq: int, steps: int):
        self.module = module
        self.target = target
        self.mode = mode
        self.batch = batch
        self.seq = seq
        self.dumps: list[tuple[str, str]] = []
        self.stablehlo = ""
        self.compiled_text = ""
        self.report: dict[str, Any] = {}
        self.infos = param_infos(module)
        self._optimizer = make_optimizer(module, self.infos, steps)
        self._init_params = jax.jit(lambda seed: init_params(self.infos, seed))
        self._init_state = jax.jit(self._state_from_seed)
        self._train_step = jax.jit(make_train_step(module, self._optimizer), donate_argnums=0)
        self._forward = jax.jit(self._logits)
        self._compiled: Any = None

    # -- pure functions that get jitted --------------------------------------------------------------------------

    def _state_from_seed(self, seed) -> TrainState:
        state = split_params(self.infos, init_params(self.infos, seed))
        state["opt_state"] = self._optimizer.init(state["params"])
        state["step"] = jnp.zeros((), jnp.int32)
        return state

    def _logits(self, params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
        padded = jnp.pad(tokens, ((0, 0), (0, 1)))  # the model reads [B, S+1]: inputs plus one label column
        return run_model(self.module, params, padded).metrics["logits"]

    # -- abstract shapes -----------------------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self._state_from_seed, 0)

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {name: jax.ShapeDtypeStruct(i.shape, i.dtype) for name, i in self.infos.items()}

    def lower(self):
        """Lowers the program's main function (train step or forward) from shapes alone."""
        if self.mode == "train":
            tokens = jax.ShapeDtypeStruct((self.batch, self.seq + 1), jnp.int32)
            return self._train_step.lower(self.abstract_state(), {"tokens": tokens})
        tokens = jax.ShapeDtypeStruct((self.batch, self.seq), jnp.int32)
        return self._forward.lower(self.abstract_params(), tokens)

    # -- public API ----------------------------------------------------------------------------------------------

    def _require_local(self, what: str) -> None:
        if not self.target.local:
            raise UserError(f"{what} needs the target's hardware; '{self.target.name}' was compiled ahead of time")

    def init_params(self, seed: int = 0) -> dict[str, jax.Array]:
        """All parameters (router biases included), initialised as the IR declares."""
        self._require_local("init_params")
        return self._init_params(seed)

    def init_state(self, seed: int = 0) -> TrainState:
        """Trainable params, router biases, optimizer state and step counter."""
        self._require_local("init_state")
        return self._init_state(seed)

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on `batch["tokens"]` int32[B, S+1]. The state is donated: use the returned one."""
        if self.mode != "train":
            raise UserError(f"train_step needs a program compiled with mode='train' (this one is '{self.mode}')")
        self._require_local("train_step")
        tokens = batch["tokens"]
        if self._compiled is not None and tokens.shape == (self.batch, self.seq + 1):
            return self._compiled(state, {"tokens": tokens})
        return self._train_step(state, {"tokens": tokens})

    def forward(self, params: dict[str, jax.Array] | TrainState, tokens: jax.Array) -> jax.Array:
        """float32 logits [B, S, vocab] for int32 tokens [B, S]. Accepts a parameter dict or a training state."""
        self._require_local("forward")
        if "params" in params and "router_bias" in params:
            params = {**params["params"], **params["router_bias"]}
        return self._forward(params, jnp.asarray(tokens, jnp.int32))


def compile(
    source: Source,
    target: str = "cpu",
    mode: str = "train",
    batch: int = 8,
    seq: int = 128,
    mesh: dict[str, int] | None = None,
    shard_mode: str = "auto",
    pipeline: str | None = "default",
    steps: int = 1000,
    log: Callable[[str], None] | None = None,
) -> Program:
    """Compiles a spec, spec path, IR path or IR module for `target`. `pipeline` is `default` (the mode's default
    passes), a `-p` style pass list, or None/"" for no passes. `steps` is the run length the learning-rate schedule
    decays over when the IR's `decay_steps` is 0."""
    say = log or (lambda _msg: None)
    seconds: dict[str, float] = {}
    _check_options(mode, batch, seq, mesh, shard_mode)
    tgt = resolve_target(target)
    if tgt.name != "cpu":
        raise UserError(f"target '{target}' is not supported yet: this version compiles for 'cpu' only")

    clock = time.perf_counter()
    module = load_module(source)
    dumps = [("input", print_ir(module))]
    seconds["parse"] = time.perf_counter() - clock
    say(f"parsed and built IR ({seconds['parse']:.2f}s)")

    clock = time.perf_counter()
    spec = default_pipeline(mode) if pipeline == "default" else (pipeline or "")
    dumps += run_pipeline(module, spec)
    seconds["passes"] = time.perf_counter() - clock
    say(f"ran passes [{spec or 'none'}] ({seconds['passes']:.2f}s)")

    prog = Program(module, tgt, mode, batch, seq, steps)
    clock = time.perf_counter()
    lowered = prog.lower()
    prog.stablehlo = lowered.as_text()
    seconds["lower"] = time.perf_counter() - clock
    say(f"lowered to StableHLO ({seconds['lower']:.2f}s)")

    clock = time.perf_counter()
    compiled = lowered.compile()
    prog.compiled_text = compiled.as_text()
    seconds["compile"] = time.perf_counter() - clock
    say(f"compiled with XLA for {tgt.name} ({seconds['compile']:.2f}s)")
    if mode == "train":
        prog._compiled = compiled

    prog.dumps = [*dumps, ("stablehlo", prog.stablehlo), ("compiled", prog.compiled_text)]
    counts = count_params(module)
    prog.report = {
        "target": tgt.name,
        "devices": tgt.chips,
        "mesh": dict(mesh or {}),
        "shard_mode": shard_mode,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "vocab": _vocab(prog),
        "params_total": counts["total"],
        "params_active_per_token": counts["active"],
        "params_mtp": counts["mtp_total"],
        "params_mtp_active_per_token": counts["mtp_active"],
        "memory_per_device_bytes": memory_report(compiled),
        "flops_per_step": model_flops(module, batch, seq, train=mode == "train"),
        "xla_flops_per_step": flops(compiled),
        "collectives": collectives(prog.compiled_text),
        "compile_seconds": seconds,
        "pipeline": spec,
    }
    return prog


def _vocab(prog: Program) -> int:
    info = prog.infos.get("embed")
    return info.shape[0] if info else 0


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
