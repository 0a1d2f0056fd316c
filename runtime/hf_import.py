"""Importing a HuggingFace DeepSeek-V3 checkpoint: `config.json` -> `.dsv3` spec, `*.safetensors` -> parameters.

The checkpoint is read lazily. Each shard's header is parsed once and its data memory-mapped; a tensor is copied out
only when the parameter that needs it is filled, straight into the preallocated array of the IR's layout (Linear
weights [in, out], layers stacked on a leading axis, experts stacked expert-major). So the peak memory is the
imported parameters plus one tensor, never two copies of the checkpoint.

Layout decisions, made once here (the IR then says what they mean):
- HF Linear weights are [out, in]; ours are [in, out] (transposed on import).
- `rope_interleave` (true unless the config says otherwise, as in DeepSeek's release) means the rotary part of
  `q_b_proj`/`kv_a_proj_with_mqa` outputs is stored as interleaved pairs: spec `layout interleaved`; false means
  half-split pairs: `layout half`. Queries and keys are rotated alike, so the attention scores are the checkpoint's.
- YaRN comes from `rope_scaling` (older configs) or `rope_parameters` (transformers >= 5). An `mscale` or
  `mscale_all_dim` that the config leaves out is 0, as transformers reads it, and is written into the spec as 0.
- The MTP module is layer index `num_hidden_layers` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, an ordinary
  block); its `shared_head.head` and `embed_tokens` copies are not read: the IR shares the main model's.
- FP8 E4M3 weights with a `weight_scale_inv` are dequantised per block (`w * scale`, block size from
  `quantization_config.weight_block_size`, 128x128 by default) into the spec's parameter dtype.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..frontend.errors import UserError
from ..frontend.parser import parse
from ..frontend.spec import ModelSpec

# safetensors dtype names -> NumPy dtypes (ml_dtypes supplies bfloat16 and the FP8 formats)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


class CheckpointError(UserError):
    """A checkpoint that does not match its config or is damaged; the message names the tensor and the file."""


# ---------------------------------------------------------------------------------------------------------------
# Lazy safetensors reading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(name: str, meta: Any, path: Path) -> _Entry:
    """One tensor's header entry, checked: a known dtype, a shape of counts, offsets that hold exactly the bytes
    the dtype and shape need (a header that says I32 over F32 data of the same size is caught by `_Reader`)."""
    where = f"tensor '{name}' in {path}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its header entry is not a JSON object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported or missing dtype {dtype!r}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r}")
    entry = _Entry(_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    expected = math.prod(entry.shape) * entry.dtype.itemsize
    if entry.end - entry.start != expected:
        raise CheckpointError(f"{where}: {entry.end - entry.start} bytes for shape {shape} of {dtype} ({expected})")
    return entry


class SafetensorsFile:
    """One `.safetensors` file: the JSON header parsed eagerly (it is small), the data memory-mapped on first use.

    Reading the format directly (8-byte header length, JSON header, raw data) rather than through
    `safetensors.safe_open` gives every dtype a DeepSeek checkpoint uses (BF16, F8_E4M3) as a NumPy array via
    ml_dtypes, and lets a truncated file be reported with the name of the first tensor it cuts off."""

    def __init__(self, path: Path):
        self.path = path
        self._map: mmap.mmap | None = None
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (length,) = struct.unpack("<Q", raw)
                size = path.stat().st_size
                if length > size - 8:
                    raise CheckpointError(f"{path}: truncated (header of {length} bytes in a {size}-byte file)")
                header = json.loads(f.read(length))
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (bad header)") from None
        self.data_start = 8 + length
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
        self.entries = {
            name: _header_entry(name, meta, path) for name, meta in header.items() if name != "__metadata__"
        }
        self.size = path.stat().st_size

    def read(self, name: str) -> np.ndarray:
        """A copy of tensor `name` (the mapping is released when the file object goes)."""
        e = self.entries[name]
        if self.data_start + e.end > self.size:
            raise CheckpointError(
                f"tensor '{name}' in {self.path} is cut off: the file ends at byte {self.size}, the tensor at "
                f"{self.data_start + e.end} (truncated download?)"
            )
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(self._map, np.uint8, count=e.end - e.start, offset=self.data_start + e.start)
        return buf.view(e.dtype).reshape(e.shape).copy()


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of `model.safetensors.index.json`, checked."""
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: unreadable ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: needs a \"weight_map\" object of tensor name -> shard file name")
    return weight_map


class HFCheckpoint:
    """A HuggingFace model directory: `config.json` and one `model.safetensors` or shards listed in
    `model.safetensors.index.json` (without an index, every `*.safetensors` file in the directory)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.directory}: not a HuggingFace model directory (no config.json)")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{config_path}: unreadable ({exc})") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{config_path}: not a JSON object")
        self._files: dict[str, SafetensorsFile] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
        else:
            weight_map = {}
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{self.directory}: no *.safetensors files")
            for shard in shards:
                for name in self._file(shard.name).entries:
                    weight_map[name] = shard.name
        self.weight_map = weight_map

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in the index is missing")
            self._files[name] = SafetensorsFile(path)
        return self._files[name]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> tuple[SafetensorsFile, _Entry]:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint {self.directory}")
        f = self._file(self.weight_map[name])
        if name not in f.entries:
            raise CheckpointError(f"tensor '{name}' is listed in the index under {f.path.name}, which lacks it")
        return f, f.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1].shape

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name` as stored; with `shape`, a mismatch is an error naming the tensor."""
        f, entry = self._entry(name)
        if shape is not None and entry.shape != tuple(shape):
            raise CheckpointError(
                f"tensor '{name}' has shape {list(entry.shape)}, the config implies {list(shape)} ({f.path.name})"
            )
        return f.read(name)


# ---------------------------------------------------------------------------------------------------------------
# config.json -> .dsv3 spec
# ---------------------------------------------------------------------------------------------------------------


def _num(x: float | int) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _rope_block(cfg: dict[str, Any]) -> str:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    layout = "interleaved" if cfg.get("rope_interleave", True) else "half"
    kind = rope.get("rope_type", rope.get("type", "default"))
    parts = [f"theta {_num(theta)}", f"layout {layout}"]
    if kind not in (None, "default"):
        if kind != "yarn":
            raise UserError(f"rope type '{kind}' is not supported (dsv3c has default RoPE and YaRN)")
        if rope.get("attention_factor") is not None:
            raise UserError("YaRN with an explicit attention_factor is not supported")
        if rope.get("truncate", True) is False:
            raise UserError("YaRN with truncate = false is not supported")
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or cfg["max_position_embeddings"] / original
        yarn = (
            f"factor {_num(factor)}, original_len {int(original)}, beta_fast {_num(rope.get('beta_fast') or 32)}, "
            f"beta_slow {_num(rope.get('beta_slow') or 1)}, mscale {_num(rope.get('mscale') or 0)}, "
            f"mscale_all_dim {_num(rope.get('mscale_all_dim') or 0)}"
        )
        parts.append(f"yarn {{ {yarn} }}")
    return "rope { " + ", ".join(parts) + " }"


def _dtype(cfg: dict[str, Any], override: str | None) -> str:
    if override:
        return override
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if cfg.get("quantization_config"):
        return "bf16"  # DeepSeek's FP8 release dequantises to bf16
    known = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    if name not in known:
        raise UserError(f"config dtype {name!r} is not supported (float32, bfloat16 or float16; or pass --dtype)")
    return known[name]


def spec_text(cfg: dict[str, Any], mtp_depth: int, name: str = "imported", dtype: str | None = None) -> str:
    """The `.dsv3` spec of a HF DeepSeek-V3 (or -V2) config. `mtp_depth` is how many MTP layers the checkpoint
    actually holds (a config may announce one that a conversion dropped). A config that lacks a field the spec
    needs, or holds a value of the wrong kind, is a user error naming the field."""
    try:
        return _spec_text(cfg, mtp_depth, name, dtype)
    except KeyError as exc:
        raise UserError(f"config.json lacks '{exc.args[0]}', which the model needs") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise UserError(f"config.json holds a value of the wrong kind ({exc})") from None


def _spec_text(cfg: dict[str, Any], mtp_depth: int, name: str, dtype: str | None) -> str:
    if cfg.get("moe_layer_freq", 1) != 1:
        raise UserError("moe_layer_freq != 1 is not supported (dsv3c stacks dense layers first, then MoE layers)")
    if cfg.get("attention_bias"):
        raise UserError("attention_bias = true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{cfg['hidden_act']}' is not supported (SwiGLU uses silu)")
    heads = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads", heads) not in (None, heads):
        raise UserError("MLA needs num_key_value_heads == num_attention_heads")
    layers, experts = cfg["num_hidden_layers"], cfg.get("n_routed_experts")
    dense_first = min(cfg.get("first_k_dense_replace") or 0, layers) if experts else layers
    dt = _dtype(cfg, dtype)
    lines = [
        f"# Imported from a HuggingFace {cfg.get('model_type', 'deepseek_v3')} config by `dsv3c import-hf`.",
        f"model {name} {{",
        f"  vocab {cfg['vocab_size']}",
        f"  dim {cfg['hidden_size']}",
        f"  layers {layers} {{ dense_first {dense_first} }}",
        f"  norm rms {{ eps {_num(cfg.get('rms_norm_eps', 1e-6))} }}",
        "  attention mla {",
        f"    heads {heads}",
        f"    q_lora_rank {cfg.get('q_lora_rank') or 0}",
        f"    kv_lora_rank {cfg['kv_lora_rank']}",
        f"    head_dim {{ nope {cfg['qk_nope_head_dim']}, rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']} }}",
        f"    {_rope_block(cfg)}",
        "  }",
    ]
    if dense_first:
        lines.append(f"  ffn dense {{ hidden {cfg['intermediate_size']} }}")
    if experts and dense_first < layers:
        score = cfg.get("scoring_func", "sigmoid")
        bias = "true" if cfg.get("topk_method", "noaux_tc") == "noaux_tc" else "false"
        lines += [
            "  ffn moe {",
            f"    experts {experts} {{ top_k {cfg['num_experts_per_tok']}, shared {cfg.get('n_shared_experts') or 0}, "
            f"hidden {cfg['moe_intermediate_size']} }}",
            f"    routing {score} {{ groups {cfg.get('n_group') or 1}, keep_groups {cfg.get('topk_group') or 1}, "
            f"scale {_num(cfg.get('routed_scaling_factor', 1.0))}, "
            f"normalize {'true' if cfg.get('norm_topk_prob', True) else 'false'}, bias {bias} }}",
            "  }",
        ]
    if mtp_depth:
        lines.append(f"  mtp {{ depth {mtp_depth} }}")
    lines += [
        f"  head {{ tied {'true' if cfg.get('tie_word_embeddings') else 'false'} }}",
        f"  dtype {{ params {dt}, compute {dt} }}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def mtp_depth(ckpt: HFCheckpoint) -> int:
    """MTP layers the checkpoint holds: consecutive indices from `num_hidden_layers` with an `eh_proj`."""
    n, depth = ckpt.config.get("num_hidden_layers"), 0
    if not _is_count(n):
        raise UserError(f"config.json: num_hidden_layers must be a non-negative integer, got {n!r}")
    while f"model.layers.{n + depth}.eh_proj.weight" in ckpt:
        depth += 1
    layers = {int(m.group(1)) for key in ckpt.weight_map if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    beyond = sorted(i for i in layers if i >= n + depth)
    if beyond:
        # Importing would silently drop these layers: the config and the weights disagree.
        raise CheckpointError(
            f"the checkpoint holds layer {beyond[0]}, beyond num_hidden_layers = {n} and its {depth} MTP layer(s)"
        )
    return depth


# ---------------------------------------------------------------------------------------------------------------
# Parameters in the IR's layout
# ---------------------------------------------------------------------------------------------------------------

# local parameter name -> (HF name under `model.layers.N.`, transpose). Linear weights are [out, in] in HF.
_LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "ffn_norm": ("post_attention_layernorm.weight", False),
    "wq_a": ("self_attn.q_a_proj.weight", True),
    "q_norm": ("self_attn.q_a_layernorm.weight", False),
    "wq_b": ("self_attn.q_b_proj.weight", True),
    "wq": ("self_attn.q_proj.weight", True),
    "wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", True),
    "kv_norm": ("self_attn.kv_a_layernorm.weight", False),
    "wkv_b": ("self_attn.kv_b_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "ffn_gate": ("mlp.gate_proj.weight", True),
    "ffn_up": ("mlp.up_proj.weight", True),
    "ffn_down": ("mlp.down_proj.weight", True),
    "router": ("mlp.gate.weight", True),
    "router_bias": ("mlp.gate.e_score_correction_bias", False),
    "shared_gate": ("mlp.shared_experts.gate_proj.weight", True),
    "shared_up": ("mlp.shared_experts.up_proj.weight", True),
    "shared_down": ("mlp.shared_experts.down_proj.weight", True),
}
_EXPERTS = {"experts_gate": "gate_proj", "experts_up": "up_proj", "experts_down": "down_proj"}
_MTP_TENSORS = {"enorm": ("enorm.weight", False), "hnorm": ("hnorm.weight", False),
                "eh_proj": ("eh_proj.weight", True), "norm": ("shared_head.norm.weight", False)}


@dataclass
class _Reader:
    """Reads HF tensors, checks their shapes against what the IR expects, and dequantises FP8 blocks."""

    ckpt: HFCheckpoint
    block: tuple[int, int]
    dequantised: list[str] = field(default_factory=list)

    def weight(self, name: str, shape: tuple[int, ...], transpose: bool, dtype: np.dtype) -> np.ndarray:
        """Tensor `name` in our layout ([in, out] when `transpose`), converted to `dtype`."""
        hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        value = self.ckpt.read(name, hf_shape)
        if not np.issubdtype(value.dtype, np.floating) and value.dtype not in _FP8:
            raise CheckpointError(f"tensor '{name}' is stored as {value.dtype}; weights must be floating point")
        if value.dtype in _FP8:
            value = self._dequantise(name, value)
        value = value.astype(np.float32) if value.dtype != np.float32 else value
        return (value.T if transpose else value).astype(dtype)

    def _dequantise(self, name: str, value: np.ndarray) -> np.ndarray:
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if scale_name not in self.ckpt:
            raise CheckpointError(f"tensor '{name}' is FP8 but '{scale_name}' is missing")
        rows, cols = value.shape
        br, bc = self.block
        scale = self.ckpt.read(scale_name, (math.ceil(rows / br), math.ceil(cols / bc))).astype(np.float32)
        full = np.repeat(np.repeat(scale, br, axis=0), bc, axis=1)[:rows, :cols]
        self.dequantised.append(name)
        return value.astype(np.float32) * full

    def experts(self, prefix: str, which: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """[E, in, out] from per-expert `experts.{e}.{which}.weight` [out, in], or from the fused `gate_up_proj`
        [E, 2I, D] / `down_proj` [E, D, I] that transformers >= 5 keeps in memory."""
        e = shape[0]
        fused_gate_up, fused_down = f"{prefix}mlp.experts.gate_up_proj", f"{prefix}mlp.experts.down_proj"
        if which in ("gate_proj", "up_proj") and fused_gate_up in self.ckpt:
            inter = shape[2]
            both = self.ckpt.read(fused_gate_up, (e, 2 * inter, shape[1])).astype(np.float32)
            half = both[:, :inter] if which == "gate_proj" else both[:, inter:]
            return half.transpose(0, 2, 1).astype(dtype)
        if which == "down_proj" and fused_down in self.ckpt:
            down = self.ckpt.read(fused_down, (e, shape[2], shape[1])).astype(np.float32)
            return down.transpose(0, 2, 1).astype(dtype)
        out = np.empty(shape, dtype)
        for j in range(e):
            out[j] = self.weight(f"{prefix}mlp.experts.{j}.{which}.weight", shape[1:], True, dtype)
        return out


def _layer_param(reader: _Reader, local: str, layer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    prefix = f"model.layers.{layer}."
    if local in _EXPERTS:
        return reader.experts(prefix, _EXPERTS[local], shape, dtype)
    if local == "router_bias" and prefix + _LAYER_TENSORS[local][0] not in reader.ckpt:
        return np.zeros(shape, dtype)  # V2-style routing has no correction bias
    hf, transpose = _LAYER_TENSORS[local]
    return reader.weight(prefix + hf, shape, transpose, dtype)


def _param_sources(spec: ModelSpec) -> Iterator[tuple[str, Callable[[_Reader, tuple[int, ...], np.dtype], np.ndarray]]]:
    """(IR parameter name, function filling it) for every parameter a spec's IR declares."""
    layers = spec.layers
    stacks = [("dense.", range(spec.dense_layers)), ("moe.", range(spec.dense_layers, layers))]
    stacks += [(f"mtp.{k}.block.", range(layers + k, layers + k + 1)) for k in range(spec.mtp.depth)]

    def stacked(local: str, indices: range):
        def fill(reader: _Reader, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            out = np.empty(shape, dtype)
            for slot, layer in enumerate(indices):
                out[slot] = _layer_param(reader, local, layer, shape[1:], dtype)
            return out

        return fill

    def plain(hf: str, transpose: bool):
        return lambda reader, shape, dtype: reader.weight(hf, shape, transpose, dtype)

    yield "embed", plain("model.embed_tokens.weight", False)
    yield "final_norm", plain("model.norm.weight", False)
    yield "head", plain("lm_head.weight", True)
    for prefix, indices in stacks:
        for local in (*_LAYER_TENSORS, *_EXPERTS):
            yield prefix + local, stacked(local, indices)
    for k in range(spec.mtp.depth):
        for local, (hf, transpose) in _MTP_TENSORS.items():
            yield f"mtp.{k}.{local}", plain(f"model.layers.{layers + k}.{hf}", transpose)


def load_params(ckpt: HFCheckpoint, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Every parameter of `spec`'s IR, filled from the checkpoint, as NumPy arrays in the IR's dtypes."""
    from ..frontend.builder import build_ir
    from .model import param_infos

    infos = param_infos(build_ir(spec))
    quant = ckpt.config.get("quantization_config") or {}
    block = (quant.get("weight_block_size") or [128, 128]) if isinstance(quant, dict) else None
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(_is_count(b) and b > 0 for b in block)):
        raise UserError(f"config.json: quantization_config.weight_block_size must be two positive integers: {block}")
    reader = _Reader(ckpt, (block[0], block[1]))
    sources = dict(_param_sources(spec))
    params: dict[str, np.ndarray] = {}
    for name, info in infos.items():
        if name not in sources:
            raise CheckpointError(f"no checkpoint tensor maps to parameter '{name}'")
        params[name] = sources[name](reader, info.shape, np.dtype(info.dtype))
    return params


def import_hf(
    directory: str | Path, name: str = "imported", dtype: str | None = None
) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """(spec, params) for a HF DeepSeek-V3 directory; params are a flat dict in the IR's layout, as
    `Program.init_params` returns (NumPy arrays; `jax.numpy.asarray` them or pass them as they are).
    `dtype` (`f32`, `bf16`, `f16`) overrides the parameter and compute dtype taken from the config."""
    ckpt = HFCheckpoint(directory)
    text = spec_text(ckpt.config, mtp_depth(ckpt), name, dtype)
    spec = parse(text, str(Path(directory) / "config.json"))
    return spec, load_params(ckpt, spec)
