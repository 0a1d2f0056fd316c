"""Exporting a dsv3c model to the HuggingFace DeepSeek-V3 layout: the inverse of `runtime/hf_import.py`.

`config.json` is written from the spec; the parameters (flat, in the IR's layout) become HF tensors: Linear weights
transposed back to [out, in], stacked layers split into `model.layers.N.`, experts split into
`mlp.experts.J.{gate,up,down}_proj`, the MTP module at index `num_hidden_layers` with copies of the embedding and
head (as DeepSeek's release stores them). Tensors are produced one at a time while the shards are written, so the
peak memory is the parameters plus one tensor.

With `fp8`, every Linear weight of the decoder layers (the router gate excepted) is stored as float8_e4m3fn with a
float32 `weight_scale_inv` per 128x128 block (a multiplier, despite its name: w ~= fp8 * scale), with the
`quantization_config` DeepSeek-V3's release declares. The quantisation is `runtime/fp8.quantize` (amax / 448 per
block), so importing the export gives exactly the dequantised weights.

The export is written into a temporary directory beside the target and renamed into place when complete: an
interrupted export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..frontend.errors import UserError
from ..frontend.spec import ModelSpec
from .checkpoint import is_training_checkpoint, load_checkpoint_params
from .hf_import import _EXPERTS, _LAYER_TENSORS, _MTP_TENSORS
from .params_io import read_params_file

FP8_BLOCK = 128
DEFAULT_SHARD_BYTES = 5 * 2**30  # what transformers' save_pretrained uses

# NumPy dtype -> safetensors dtype name (the inverse of hf_import._DTYPES for what an export writes)
_ST_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
}
_TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


# ---------------------------------------------------------------------------------------------------------------
# spec -> config.json
# ---------------------------------------------------------------------------------------------------------------


def hf_config(spec: ModelSpec, fp8: bool = False, block: int = FP8_BLOCK) -> dict[str, Any]:
    """The `config.json` of `spec` as transformers' `DeepseekV3Config` reads it (and `import-hf` reads it back).
    Training-only settings (optimizer, balance rates, init, MTP loss weight) have no HF field and are left out."""
    a, moe = spec.attention, spec.moe
    yarn = a.rope.yarn
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": spec.vocab,
        "hidden_size": spec.dim,
        "num_hidden_layers": spec.layers,
        "first_k_dense_replace": spec.dense_layers,
        "moe_layer_freq": 1,
        "rms_norm_eps": spec.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads,
        "q_lora_rank": a.q_lora_rank or None,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.nope_dim,
        "qk_rope_head_dim": a.rope_dim,
        "qk_head_dim": a.nope_dim + a.rope_dim,
        "head_dim": a.rope_dim,
        "v_head_dim": a.v_dim,
        "rope_theta": a.rope.theta,
        "rope_interleave": a.rope.layout == "interleaved",
        "rope_scaling": None,
        "max_position_embeddings": int(yarn.factor * yarn.original_len) if yarn else 4096,
        "intermediate_size": (spec.dense_ffn or moe).hidden,  # type: ignore[union-attr]
        "num_nextn_predict_layers": spec.mtp.depth,
        "tie_word_embeddings": spec.tied_head,
        "torch_dtype": _TORCH_DTYPES[spec.dtypes.params],
    }
    if yarn is not None:
        cfg["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn", "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_len, "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow, "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale_all_dim,
        }
    if moe is not None:
        cfg.update({
            "n_routed_experts": moe.experts,
            "num_experts_per_tok": moe.top_k,
            "n_shared_experts": moe.shared,
            "moe_intermediate_size": moe.hidden,
            "scoring_func": moe.score,
            "topk_method": "noaux_tc" if moe.router_bias else "greedy",
            "n_group": moe.groups,
            "topk_group": moe.keep_groups,
            "routed_scaling_factor": moe.scale,
            "norm_topk_prob": moe.normalize,
        })
    else:
        cfg["n_routed_experts"] = None
    if fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block],
        }
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# parameters -> HF tensors
# ---------------------------------------------------------------------------------------------------------------


Tensor = tuple[str, np.ndarray]


def _layer_tensors(local: str, value: np.ndarray, prefix: str) -> Iterator[Tensor]:
    """The HF tensors of one layer's parameter `local` (its slice of a stack), as views of it."""
    if local in _EXPERTS:
        for j in range(value.shape[0]):
            yield f"{prefix}mlp.experts.{j}.{_EXPERTS[local]}.weight", value[j].T
        return
    hf, transpose = _LAYER_TENSORS[local]
    yield prefix + hf, value.T if transpose else value


def hf_tensors(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> list[Tensor]:
    """Every tensor of the HF checkpoint of `spec` (views of `params`, nothing copied), in the order the release
    stores them: embedding, layers in order, MTP layers, final norm, head. A parameter no HF tensor holds is an
    error: nothing is dropped silently."""
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return params[name]

    head = take("embed") if spec.tied_head else take("head").T
    out = [("model.embed_tokens.weight", take("embed"))]
    stacks = [("dense.", range(spec.dense_layers)), ("moe.", range(spec.dense_layers, spec.layers))]
    stacks += [(f"mtp.{k}.block.", range(spec.layers + k, spec.layers + k + 1)) for k in range(spec.mtp.depth)]
    for stack, layers in stacks:
        present = [local for local in (*_LAYER_TENSORS, *_EXPERTS) if stack + local in params]
        if "router_bias" in present and not (spec.moe and spec.moe.router_bias):
            present.remove("router_bias")  # a bias the routing never reads: HF configs without noaux_tc have none
            used.add(stack + "router_bias")
        for slot, layer in enumerate(layers):
            prefix = f"model.layers.{layer}."
            if stack.startswith("mtp."):
                k = layer - spec.layers
                for local, (hf, transpose) in _MTP_TENSORS.items():
                    value = take(f"mtp.{k}.{local}")
                    out.append((prefix + hf, value.T if transpose else value))
                out += [(prefix + "embed_tokens.weight", take("embed")), (prefix + "shared_head.head.weight", head)]
            for local in present:
                out.extend(_layer_tensors(local, take(stack + local)[slot], prefix))
    out.append(("model.norm.weight", take("final_norm")))
    if not spec.tied_head:
        out.append(("lm_head.weight", head))
    unused = sorted(set(params) - used)
    if unused:
        raise UserError(f"parameter '{unused[0]}' has no place in the HF layout (does the spec match the params?)")
    return out


def _fp8_candidate(name: str, value: np.ndarray) -> bool:
    """A Linear weight of a decoder layer: DeepSeek-V3's release stores these in FP8 (the router gate, norms,
    embedding and head copies stay in full precision)."""
    linear = name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")
    return name.startswith("model.layers.") and linear and value.ndim == 2


def _quantize_fp8(value: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn values, float32 scales [ceil(rows/block), ceil(cols/block)]) with w ~= values * scale."""
    import jax.numpy as jnp

    from .fp8 import Tiling, quantize

    values, scales = quantize(jnp.asarray(value, jnp.float32), Tiling("e4m3", block, block))
    return np.asarray(values), np.asarray(scales, np.float32)


@dataclass(frozen=True)
class _Stored:
    """One tensor as it goes on disk: its dtype and shape known up front (to plan shards), its bytes made when its
    shard is written (an FP8 weight is quantised then, once for the values and once for the scales)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _stored(tensors: list[Tensor], fp8: bool, block: int) -> Iterator[_Stored]:
    """What goes on disk: each tensor in its own dtype or, with `fp8`, each Linear weight in FP8 with its
    `weight_scale_inv`."""
    for name, value in tensors:
        if not (fp8 and _fp8_candidate(name, value)):
            yield _Stored(name, value.dtype, value.shape, lambda v=value: v)
            continue
        rows, cols = value.shape
        pending: dict[str, np.ndarray] = {}  # the scales, from quantising the values until they are written

        def values(v: np.ndarray = value, pending: dict = pending) -> np.ndarray:
            q, pending["scales"] = _quantize_fp8(v, block)
            return q

        def scales(v: np.ndarray = value, pending: dict = pending) -> np.ndarray:
            return pending.pop("scales") if "scales" in pending else _quantize_fp8(v, block)[1]

        yield _Stored(name, np.dtype(ml_dtypes.float8_e4m3fn), value.shape, values)
        yield _Stored(name.removesuffix("weight") + "weight_scale_inv", np.dtype(np.float32),
                      (-(-rows // block), -(-cols // block)), scales)


# ---------------------------------------------------------------------------------------------------------------
# safetensors writing
# ---------------------------------------------------------------------------------------------------------------


def _header(items: list[_Stored]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in items:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"tensor '{t.name}' is {t.dtype}, which the HF layout does not store")
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it


def _write_shard(path: Path, items: list[_Stored]) -> None:
    header = _header(items)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in items:
            f.write(np.ascontiguousarray(t.make()).view(np.uint8).reshape(-1).data)
        f.flush()
        os.fsync(f.fileno())


def _plan_shards(stored: list[_Stored], limit: int) -> list[list[_Stored]]:
    """Tensors grouped in order into shards of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[_Stored]] = [[]]
    size = 0
    for t in stored:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def export_hf(
    spec: ModelSpec | str | Path,
    params: Mapping[str, Any],
    hf_dir: str | Path,
    fp8: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    block: int = FP8_BLOCK,
    tokenizer: str | Path | None = None,
) -> Path:
    """Writes `spec` with `params` (a flat dict in the IR's layout, as `import_hf` and `Program.init_params` return,
    or a training state with `params` and `router_bias`) as a HF DeepSeek-V3 directory: `config.json`,
    `model-0000K-of-0000N.safetensors` shards of at most `shard_bytes`, `model.safetensors.index.json`, and
    `tokenizer.json` when a tokenizer is given. `hf_dir` must not exist or be empty. Returns its path."""
    from ..frontend.parser import load

    if not isinstance(spec, ModelSpec):
        spec = load(spec)
    if "params" in params and "router_bias" in params:
        params = {**params["params"], **params["router_bias"]}
    params = {name: np.asarray(value) for name, value in params.items()}
    _check_params(spec, params)
    if block < 1 or shard_bytes < 1:
        raise UserError("the FP8 block and the shard size must be positive")
    out = Path(hf_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: choose another or remove it")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UserError(f"tokenizer {tokenizer}: no such file")
    shards = _plan_shards(list(_stored(hf_tensors(spec, params), fp8, block)), shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tmp / file, shard)
            weight_map.update({t.name: file for t in shard})
            total += sum(t.nbytes for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(spec, fp8, block), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_params(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> None:
    """The parameters are the spec's: every one present with its shape (a checkpoint of another model is refused
    before anything is written)."""
    from ..frontend.builder import build_ir
    from .model import param_infos

    for name, info in param_infos(build_ir(spec)).items():
        if name not in params:
            raise UserError(f"parameter '{name}' is missing (the parameters are not the spec's model)")
        if tuple(params[name].shape) != tuple(info.shape):
            raise UserError(
                f"parameter '{name}' has shape {list(params[name].shape)}, the spec's model has {list(info.shape)}"
            )


# ---------------------------------------------------------------------------------------------------------------
# where the parameters come from
# ---------------------------------------------------------------------------------------------------------------


def params_from_checkpoint(ckpt_dir: str | Path, ema: bool = False) -> dict[str, np.ndarray]:
    """The model parameters (router biases included) of the newest training checkpoint in `ckpt_dir` (or of that
    `step_N` folder), or of an `import-hf --params` directory, by IR name. `ema` selects a training checkpoint's
    moving average of the parameters."""
    directory = Path(ckpt_dir)
    if is_training_checkpoint(directory):
        return load_checkpoint_params(directory, ema)
    if ema:
        raise UserError(f"--ema: {directory} is not a training checkpoint (only those hold an EMA)")
    return read_params_file(directory)
