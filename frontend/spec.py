"""The validated, typed form of a `.dsv3` spec.

The parser (`frontend/parser.py`) turns text into these frozen dataclasses; the IR builder
(`frontend/builder.py`) turns them into dsv3 IR. Nothing downstream of the builder reads a spec: the IR is the single
source of truth. Defaults follow DeepSeek-V3 (REFERENCE.md section 1) wherever a field has an obvious V3 value.

`ModelSpec.positions` maps dotted field paths ("model.moe.top_k") to the (line, col) where the field was written, so
that semantic checks made after parsing can still point at the offending text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["f32", "bf16", "f16"]


@dataclass(frozen=True)
class YarnSpec:
    """YaRN context extension of RoPE (applied to the rope part of queries and keys)."""

    factor: float
    original_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding. `layout` says how rotated pairs are stored: `interleaved` pairs (2i, 2i+1) as in
    DeepSeek's reference code, `half` pairs (i, i + d/2) as in HF transformers after its load-time permutation."""

    theta: float = 10000.0
    layout: Literal["interleaved", "half"] = "half"
    yarn: YarnSpec | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head Latent Attention. `q_lora_rank == 0` means queries are projected directly (no query LoRA), as in
    DeepSeek-V2-Lite."""

    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    rope: RopeSpec = field(default_factory=RopeSpec)


@dataclass(frozen=True)
class DenseFFNSpec:
    """SwiGLU feed-forward block used by the first `dense_first` layers."""

    hidden: int
    act: Literal["swiglu"] = "swiglu"


@dataclass(frozen=True)
class MoESpec:
    """DeepSeekMoE: routed experts with group-limited, auxiliary-loss-free routing plus shared experts."""

    experts: int
    top_k: int
    hidden: int
    shared: int = 1
    score: Literal["sigmoid", "softmax"] = "sigmoid"
    groups: int = 1
    keep_groups: int = 1
    scale: float = 1.0
    normalize: bool = True
    router_bias: bool = True
    bias_rate: float = 0.0
    seq_aux: float = 0.0


@dataclass(frozen=True)
class MTPSpec:
    """Multi-token prediction: `depth` extra sequential modules, loss weight `weight` (the paper's lambda)."""

    depth: int = 0
    weight: float = 0.3


@dataclass(frozen=True)
class InitSpec:
    """Initialisation: N(0, std) everywhere; MLA projections use `mla_std` when set, with the attention output
    projection scaled by 1/sqrt(2 * layers) (MaxText's DeepSeek init)."""

    std: float = 0.006
    mla_std: float | None = None


@dataclass(frozen=True)
class DTypeSpec:
    """Storage dtype of parameters (master weights) and compute dtype of activations."""

    params: DType = "f32"
    compute: DType = "bf16"


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with warmup and a decay schedule. `decay_steps == 0` means: decay over the run's `--steps`."""

    kind: Literal["adamw"] = "adamw"
    lr: float = 2.2e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0
    moments: DType = "f32"
    grads: Literal["compute", "f32"] = "compute"
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    ema_decay: float | None = None  # `ema { decay }`: keep a moving average of the parameters in host memory


@dataclass(frozen=True)
class DataSpec:
    """Where training text comes from and how it is held out: the `train { data { ... } }` block.

    None of it changes the compiled program (document starts travel inside the token batch, see
    `dsv3.token_window`), so it is not written into the IR: it is read by the training run, like `--batch` and
    `--seed`, and the command line's data flags override it. Paths are relative to the spec's directory.

    `text` is a glob of raw text (a `.jsonl` file holds one document per line under `jsonl_key`; any other file is
    one document; `.array_record` files hold one UTF-8 document per record), tokenized with `tokenizer` (a
    `tokenizer.json`) with `eos` appended to every document. `tokens` is a glob of token-id shards (`.npy`, or raw
    `.bin` of `bin_dtype`), cut into documents at `eos_id` when given. `eval_fraction` of the documents are held out;
    every `eval_every` steps (0: never) the loss over `eval_batches` batches of them is reported."""

    text: str | None = None
    tokenizer: str | None = None
    jsonl_key: str = "text"
    eos: str = "<|endoftext|>"
    tokens: str | None = None
    bin_dtype: Literal["uint16", "uint32", "int32"] = "uint16"
    eos_id: int | None = None
    eval_fraction: float = 0.05
    eval_every: int = 0
    eval_batches: int = 4


@dataclass(frozen=True)
class ParallelSpec:
    """How to lay a training step out on a target's chips: the `parallel { ... }` block, as `dsv3c plan
    --write-spec` writes it or a user does by hand.

    `mesh` maps mesh axes to sizes (`{"fsdp": 2, "tensor": 2}`), `shard_mode` is the `dsv3-shard` mode, `remat` the
    `dsv3-remat` policy (None: the target's default), `head_loss` whether the output head and its loss run fused
    (`dsv3-fuse-head-loss`). With `target`, only compiles for that target use the block. The builder writes it into
    the IR as `dsv3.parallel`, which `dsv3c.compile` reads for the defaults the caller leaves open."""

    mesh: dict[str, int]
    shard_mode: Literal["auto", "explicit"] = "auto"
    remat: Literal["none", "outputs", "deepseek", "full"] | None = None
    head_loss: Literal["unfused", "fused"] = "unfused"
    target: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A whole DeepSeek-V3-family model. `moe is None` makes every layer dense."""

    name: str
    vocab: int
    dim: int
    layers: int
    attention: AttentionSpec
    dense_ffn: DenseFFNSpec | None = None
    moe: MoESpec | None = None
    dense_first: int = 0
    norm_eps: float = 1e-6
    tied_head: bool = False
    mtp: MTPSpec = field(default_factory=MTPSpec)
    init: InitSpec = field(default_factory=InitSpec)
    grad_mask_threshold: float | None = None
    dtypes: DTypeSpec = field(default_factory=DTypeSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    data: DataSpec | None = None
    parallel: ParallelSpec | None = None
    path: str = "<string>"
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_layers(self) -> int:
        return 0 if self.moe is None else self.layers - self.dense_first

    @property
    def dense_layers(self) -> int:
        return self.layers if self.moe is None else self.dense_first
