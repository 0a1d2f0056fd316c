"""Compilation targets: each target family is one class that owns everything that differs between targets: what its
chip offers (HBM, peak FLOP/s, FP8), how many chips a name means, where its JAX devices come from (the local backend,
or a TPU/GPU topology description that lets XLA compile for hardware this machine does not have, ahead of time, from
shapes alone), its default pass pipeline per mode as pass objects, the kernels its lowering uses, and its XLA
options. `dsv3c.compile` reads as a straight line over it: frontend -> `target.pipeline` -> verify and dump ->
`target.check_lowerable` -> lower -> compile -> report."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.passes import ModulePass

from .dialects.kernels import Kernel
from .frontend.errors import UserError
from .passes.drop_mtp import DropMTP
from .passes.fp8_quant import FP8Quant
from .passes.fuse_head_loss import FuseHeadLossPass
from .passes.kernels import KernelsPass
from .passes.kv_cache import KVCache
from .passes.mla_absorb import MLAAbsorb
from .passes.overlap import OverlapPass
from .passes.pipeline import PipelinePass
from .passes.remat import RematPass
from .passes.shard import ShardPass
from .runtime.lower.registry import FP8_BACKEND_ATTR

GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    """One accelerator chip (or the host, for `cpu`). Peak FLOP/s are dense bf16; bandwidths in bytes/s."""

    kind: str
    platform: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    interconnect_bandwidth: float
    has_fp8: bool


CHIPS = {
    "cpu": Chip("cpu", "cpu", 0, 0.0, 0.0, 0.0, False),
    "h100": Chip("h100", "gpu", 80 * GiB, 989e12, 3.35e12, 450e9, True),
    "h200": Chip("h200", "gpu", 141 * GiB, 989e12, 4.8e12, 450e9, True),
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, 2.765e12, 600e9, False),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, 0.819e12, 200e9, False),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12, 1.64e12, 400e9, False),
}

# Device descriptions for ahead-of-time GPU compiles (a GpuTargetConfig text proto): published hardware figures.
_GPU_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{name}"
"""
_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


@dataclass(frozen=True)
class PipelineRequest:
    """What a compile asks of the pass pipeline beyond the mode: FP8 (`off`, `native`, `emulate`) and a mesh
    (`{"fsdp": 4}`) with its sharding mode and rule overrides."""

    fp8: str = "off"
    mesh: dict[str, int] = field(default_factory=dict)
    shard_mode: str = "auto"
    rules: str = ""


_MODE_PASSES: dict[str, Callable[[], list[ModulePass]]] = {
    # DeepSeek-V3's recompute policy; `keep` honours one already in the IR (a hand-edited `.mlir`).
    "train": lambda: [RematPass(policy="deepseek", keep=True)],
    "forward": lambda: [DropMTP()],
    "prefill": lambda: [DropMTP(), MLAAbsorb(), KVCache()],
    "decode": lambda: [DropMTP(), MLAAbsorb(), KVCache()],
}

_AFTER_FP8 = ("dsv3-remat", "dsv3-overlap", "dsv3-shard")
"""Passes that must see the FP8 ops: `dsv3-remat` tags the quantised values, so that backward keeps FP8 copies of the
activations (DeepSeek-V3's FP8 caching) rather than BF16 ones."""


@dataclass(frozen=True)
class Target:
    """A named target of `chips` devices of one kind: what it runs on, which passes compile for it, which kernels
    its lowering uses, and which XLA options it needs. `local` targets run here; the others compile ahead of time.
    `chips` is 0 when the count is free (cpu, gpu: given by the mesh or --devices).

    A target family is one subclass: it parses its names (`parse`), finds its devices, and states its kernel
    choices (`kernels`, written into the IR by `dsv3-kernels`) and the kernels its lowering can run (`offers`)."""

    name: str
    chip: Chip
    chips: int
    local: bool

    kernels: ClassVar[dict[str, Kernel]] = {"attention": Kernel.XLA, "experts": Kernel.RAGGED_DOT}
    """The kernel per op family (`dsv3-kernels` option name) that the target's pipeline chooses."""
    offers: ClassVar[frozenset[Kernel]] = frozenset(
        {Kernel.XLA, Kernel.BLOCKWISE, Kernel.RAGGED_DOT, Kernel.TILED, Kernel.PACKED}
    )
    """Every kernel the target can lower: plain-JAX kernels run anywhere, Pallas kernels only on their hardware."""
    xla_options: ClassVar[dict[str, Any]] = {}
    """XLA options every compile for the target gets (the IR's `dsv3.schedule` adds its own)."""
    xla_lays_out_state: ClassVar[bool] = False
    """Whether XLA chooses the memory layout of the training state (`Layout.AUTO`) when compiling ahead of time,
    instead of taking row-major arrays: a run must then place the state in the compiled step's `input_formats`."""

    @classmethod
    def parse(cls, name: str) -> Target | None:
        """The target named `name` if the family has it; None if the name is another family's."""
        raise NotImplementedError

    @property
    def platform(self) -> str:
        return self.chip.platform

    def device_count(self, requested: int | None) -> int:
        if self.chips and requested and requested != self.chips:
            raise UserError(f"target '{self.name}' has {self.chips} chips, but the mesh asks for {requested}")
        return self.chips or requested or 1

    def devices(self, count: int) -> list[Any]:
        """`count` JAX devices of this target, real or from a topology description."""
        raise NotImplementedError

    # -- the pass pipeline ---------------------------------------------------------------------------------------

    def fp8_backend(self, fp8: str, devices: int = 1) -> str:
        """How FP8 GEMMs run here (`exact`, `emulate`, `native`, `pallas` or `unavailable`) when `fp8` was asked for
        (or the IR holds FP8 ops anyway) on a mesh of `devices`. Asking for native FP8 where there is none is refused
        at once."""
        if fp8 == "emulate":
            return "emulate"
        if self.chip.has_fp8:
            return "native"
        if fp8 == "native":
            raise UserError(
                f"target '{self.name}' ({self.chip.kind}) has no FP8 hardware (int8 only), so it cannot run the FP8 "
                "ops natively; ask for emulation with --fp8 emulate (fp8='emulate'), or compile without "
                "dsv3-fp8-quant"
            )
        return "unavailable"

    def kernels_pass(self, fp8: str, devices: int = 1) -> ModulePass:
        """`dsv3-kernels` with this target's choices; choices already in the IR are kept (and checked later)."""
        backend = self.fp8_backend(fp8, devices)
        return KernelsPass(**{k: v.value for k, v in self.kernels.items()}, fp8=backend, keep=True)

    def default_passes(self, mode: str) -> list[ModulePass]:
        """The mode's passes before any FP8, sharding or kernel choice."""
        return _MODE_PASSES[mode]()

    def pipeline(self, base: Sequence[ModulePass], mode: str, request: PipelineRequest) -> list[ModulePass]:
        """`base` (the target's default passes or the user's) completed with what the request needs and the passes
        the user did not name: FP8 quantisation before the passes that act on what is computed, sharding and
        overlap for a mesh (and the pipeline pass for a `pipe` axis), and the target's kernel choices last."""
        passes = list(base)
        names = [p.name for p in passes]
        if request.fp8 != "off" and FP8Quant.name not in names:
            at = next((i for i, name in enumerate(names) if name in _AFTER_FP8), len(passes))
            passes.insert(at, FP8Quant())
        ranks = request.mesh.get("pipe", 1)
        if mode == "train" and ranks > 1 and PipelinePass.name not in names:
            # a pipe axis asks for pipeline stages: DeepSeek-V3's DualPipeV unless the pass is named with others
            at = next((i for i, name in enumerate(names) if name == ShardPass.name), len(passes))
            passes.insert(at, PipelinePass(ranks=ranks, schedule="dualpipev"))
        if request.mesh and ShardPass.name not in names:
            mesh = ",".join(f"{axis}={size}" for axis, size in request.mesh.items())
            passes.append(ShardPass(mesh=mesh, mode=request.shard_mode, rules=request.rules))
            if mode == "train":
                passes.append(OverlapPass(platform=self.platform))
        if KernelsPass.name not in names:
            passes.append(self.kernels_pass(request.fp8, math.prod(request.mesh.values())))
        return passes

    # -- lowering ------------------------------------------------------------------------------------------------

    def check_lowerable(self, module: ModuleOp, locate: Callable[[Exception], Exception] | None = None) -> None:
        """Refuses, before any compile, IR that asks for a kernel or an FP8 backend this target cannot run. `locate`
        positions an error whose `op` is set (at the op's line in an IR file)."""
        for op in module.walk():
            choice = getattr(op, "kernel_choice", None)
            kernel = choice() if choice else None
            if kernel is not None and kernel not in self.offers:
                offered = ", ".join(sorted(k.value for k in self.offers if k in op.KERNELS))
                error = UserError(
                    f"target '{self.name}' cannot run kernel '{kernel.value}' for '{op.name}' (it offers {offered})"
                )
                error.op = op
                raise locate(error) if locate else error
        backend = module.attributes.get(FP8_BACKEND_ATTR)
        if isinstance(backend, StringAttr) and backend.data in ("native", "pallas") and not self.chip.has_fp8:
            raise UserError(f"the IR asks for native FP8 GEMMs, but target '{self.name}' has no FP8 hardware")


@dataclass(frozen=True)
class CpuTarget(Target):
    """This machine's CPU cores. XLA:CPU lowers `lax.ragged_dot` densely (every row through every expert), so the
    experts use row tiles; attention runs blockwise so that long sequences never hold S x S scores; weight
    gradients read a packed transposed copy of the activations, which XLA:CPU's GEMM runs faster than a transposed
    operand (a train step of the 34M-parameter peer model 8% faster on one core, `benchmarks/RESULTS.md`)."""

    kernels: ClassVar[dict[str, Kernel]] = {
        "attention": Kernel.BLOCKWISE, "experts": Kernel.TILED, "matmul": Kernel.PACKED,
    }

    def default_passes(self, mode: str) -> list[ModulePass]:
        """Training computes the head's gradients in the forward pass (`dsv3-fuse-head-loss{grads=forward}`: XLA:CPU's
        unfused head backward writes the logits' gradient transposed and passes over the logits more often than its
        GEMMs need) and keeps the kernels' residuals where the shapes say recomputing them costs more
        (`dsv3-remat{kernels=auto}`): together a train step takes 0.86x the time of DeepSeek's policy alone on the
        34M-parameter peer model, 0.84x on a 256-wide one, 0.94x on `tiny` (`benchmarks/RESULTS.md`)."""
        if mode == "train":
            return [FuseHeadLossPass(grads="forward"), RematPass(policy="deepseek", kernels=("auto",), keep=True)]
        return super().default_passes(mode)

    @classmethod
    def parse(cls, name: str) -> Target | None:
        return cls(name, CHIPS["cpu"], 0, True) if name == "cpu" else None

    def fp8_backend(self, fp8: str, devices: int = 1) -> str:
        if fp8 == "native":
            raise UserError("target 'cpu' has no FP8 arithmetic: FP8 on the CPU is emulated (use --fp8 emulate)")
        return "exact"

    def devices(self, count: int) -> list[Any]:
        import jax

        have = jax.devices("cpu")
        if len(have) < count:
            raise UserError(
                f"the mesh needs {count} CPU devices but JAX has {len(have)}: pass --devices {count} (or set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts)"
            )
        return have[:count]


@dataclass(frozen=True)
class GpuTarget(Target):
    """NVIDIA H100/H200: the local GPU (`gpu`) or one compiled for ahead of time (`gpu-h100`, `gpu-h200`)."""

    kernels: ClassVar[dict[str, Kernel]] = {"attention": Kernel.CUDNN, "experts": Kernel.TILED}
    """Experts over row tiles: XLA:GPU computes `lax.ragged_dot`'s weight gradient (a ragged contraction) densely,
    every row masked once per local expert ([64 experts, 65,536 rows, 7,168] bf16, 56 GiB, four of them live at once
    in the 671B step on 128 H100s with expert=4: 287.6 GiB of temporaries against 70.2 with row tiles,
    `benchmarks/RESULTS.md`). Speed on a real H100 is not measured yet."""
    offers: ClassVar[frozenset[Kernel]] = Target.offers | {Kernel.CUDNN}

    def fp8_backend(self, fp8: str, devices: int = 1) -> str:
        """Hopper's fine-grained FP8 GEMMs as the block-scaled Pallas kernels (`runtime/kernels/fp8_gemm.py`): XLA
        has no block-scaled GEMM and round-trips every K-block's FP32 partial through memory. On a mesh of more
        than one device XLA's FP8 GEMMs run instead: a kernel call cannot be partitioned by XLA, and running it per
        shard needs a `shard_map` per FP8 op's sharding, not built yet."""
        backend = super().fp8_backend(fp8, devices)
        return "pallas" if backend == "native" and devices == 1 else backend

    def kernels_pass(self, fp8: str, devices: int = 1) -> ModulePass:
        """cuDNN attention, except ahead of time on a host without a GPU: JAX checks cuDNN's head width against the
        local device while it traces (`jax/_src/cudnn/fused_attention_stablehlo.py`, `check_is_flash_attention`)
        and, finding no Hopper, allows at most 128, where DeepSeek-V3's queries and keys are 192 wide. There the
        attention runs blockwise (online softmax, no S x S scores either), and the dump says so."""
        chosen = super().kernels_pass(fp8, devices)
        if not self.local and not _local_gpu():
            return dataclasses.replace(chosen, attention=Kernel.BLOCKWISE.value)
        return chosen

    @classmethod
    def parse(cls, name: str) -> Target | None:
        if name == "gpu":
            return cls(name, CHIPS["h100"], 0, True)
        if name in ("gpu-h100", "gpu-h200"):
            return cls(name, CHIPS[name.removeprefix("gpu-")], 0, False)
        return None

    def devices(self, count: int) -> list[Any]:
        if not self.local:
            return _gpu_devices(self.chip.kind, count)
        import jax

        try:
            have = jax.devices("gpu")
        except RuntimeError:
            raise UserError("target 'gpu' needs a local GPU and jax[cuda12]; none was found") from None
        if len(have) < count:
            raise UserError(f"the mesh needs {count} GPUs but this machine has {len(have)}")
        return have[:count]


@dataclass(frozen=True)
class TpuTarget(Target):
    """A Google TPU slice, compiled for ahead of time through libtpu. Google's slice names count TensorCores: a
    v5p-N slice has N/2 chips, v5e-N and v6e-N have N."""

    kernels: ClassVar[dict[str, Kernel]] = {"attention": Kernel.SPLASH, "experts": Kernel.RAGGED_DOT}
    offers: ClassVar[frozenset[Kernel]] = Target.offers | {Kernel.SPLASH, Kernel.MEGABLOX}
    xla_options: ClassVar[dict[str, Any]] = {"xla_jf_bf16_propagation": False}
    """XLA:TPU's bf16 propagation sees a layer scan's f32 weights read only through casts to bf16, narrows the loop's
    weight operands to bf16 and converts every layer's weights at once before the loop: a bf16 copy of each stacked
    weight, live through forward and backward (4.3 of deepseek3-test's 16.0 GiB of temporaries per v5p chip with
    fsdp=4, `benchmarks/RESULTS.md`). Without it each layer's slice is cast where it is used, as the program says."""

    xla_lays_out_state: ClassVar[bool] = True
    """With row-major weights XLA:TPU copies whole stacked weights into the layout its GEMMs and gathers want, once
    per step, and in explicit mode the widened gradients too (3.1 to 4.0 GiB of deepseek3-test's temporaries per v5p
    chip, `benchmarks/RESULTS.md`); choosing the state's layout itself, it stores them that way."""

    def default_passes(self, mode: str) -> list[ModulePass]:
        """Training on a TPU slice is bound by HBM: full recompute (MaxText's default too) needs 5.3 GiB less than
        DeepSeek's selective policy on deepseek3-test / v5p-8 with splash attention (benchmarks/RESULTS.md). The
        fused head loss is not in the default: it measured 0.3 GiB more there (the logits were not the peak)."""
        if mode == "train":
            return [RematPass(policy="full", keep=True)]
        return super().default_passes(mode)

    @classmethod
    def parse(cls, name: str) -> Target | None:
        match = re.fullmatch(r"tpu-(v5p|v5e|v6e)-(\d+)", name)
        if not match:
            return None
        kind, n = match.group(1), int(match.group(2))
        chips = n // 2 if kind == "v5p" else n
        smallest = 4 if kind == "v5p" else 1
        if chips < smallest or (kind == "v5p" and n % 2) or chips & (chips - 1):
            raise UserError(f"target '{name}': {n} is not a {kind} slice size (a power of two, at least {smallest})")
        return cls(name, CHIPS[kind], chips, False)

    def devices(self, count: int) -> list[Any]:
        return _tpu_devices(self.chip.kind, count)


TARGET_FAMILIES: tuple[type[Target], ...] = (CpuTarget, GpuTarget, TpuTarget)
"""Every target family; `resolve_target` asks each in turn. A new target is one more subclass here."""


def resolve_target(name: str) -> Target:
    """Parses a target name (`cpu`, `gpu`, `gpu-h100`, `gpu-h200`, `tpu-v5p-N`, `tpu-v5e-N`, `tpu-v6e-N`)."""
    for family in TARGET_FAMILIES:
        target = family.parse(name)
        if target is not None:
            return target
    raise UserError(
        f"unknown target '{name}' (expected cpu, gpu, gpu-h100, gpu-h200, tpu-v5p-N, tpu-v5e-N or tpu-v6e-N)"
    )


def _tpu_shape(kind: str, chips: int) -> tuple[int, ...]:
    """The chip grid of a slice: v5p slices grow as a 3-D torus from 2x2x1, v5e/v6e as 2-D grids."""
    if kind == "v5p":
        shape = [2, 2, 1]
        while math.prod(shape) < chips:
            axis = min(range(3), key=lambda a: (shape[a], -a))  # double the shortest side, z first
            shape[axis] *= 2
        return tuple(shape)
    shape = [1, 1]
    while math.prod(shape) < chips:
        shape[0 if shape[0] <= shape[1] else 1] *= 2
    return tuple(sorted(shape))


def _tpu_devices(kind: str, chips: int) -> list[Any]:
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"TPU targets need libtpu to compile ahead of time: pip install 'dsv3c[tpu]' ({kind})")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several dsv3c processes may compile at once
    from jax.experimental import topologies

    shape = _tpu_shape(kind, chips)
    host = tuple(min(s, b) for s, b in zip(shape + (1,) * (3 - len(shape)), (2, 2, 1), strict=True))
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{kind}:{'x'.join(map(str, shape))}", chip_config_name="default",
        chips_per_host_bounds=host, num_slices=1,
    )
    return list(topology.devices)


def _has_module(name: str) -> bool:
    """`find_spec` of a dotted name imports its parent package, and raises when that is missing."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _local_gpu() -> bool:
    """Whether JAX's default backend here is a GPU (starting JAX's backends as `_gpu_devices` needs them)."""
    _allow_compile_only_cuda()
    import jax

    return jax.default_backend() == "gpu"


def _allow_compile_only_cuda() -> None:
    """Lets the CUDA plugin start on a host without a GPU or a matching CUDA, where it only compiles; must be set
    before JAX starts its backends."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _gpu_devices(kind: str, count: int) -> list[Any]:
    if not _has_module("jax_plugins.xla_cuda12"):
        raise UserError(
            f"GPU targets need the CUDA plugin to compile ahead of time: pip install 'dsv3c[gpu-aot]' ({kind})"
        )
    _allow_compile_only_cuda()
    from jax.experimental import topologies

    chip = CHIPS[kind]
    config = _GPU_CONFIG.format(bandwidth=int(chip.hbm_bandwidth), memory=chip.hbm_bytes, name=_GPU_NAMES[kind])
    per_host = min(count, 8)
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{max(count // per_host, 1)}x{per_host}", target_config=config
    )
    return list(topology.devices)
