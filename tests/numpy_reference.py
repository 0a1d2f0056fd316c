"""An independent NumPy reference of a DeepSeek-V3-family model, written from the formulas (REFERENCE.md sections 2-4
and 6, HF transformers' YaRN) rather than from dsv3c's lowering, to check that lowering op by op and end to end.

Everything is computed in float64, so the reference is the exact math and a float32 lowering must agree with it to
float32 rounding. Parameters are read by the names and layouts the IR declares (Linear weights [in, out]; per-layer
parameters stacked on a leading axis under `dense.`, `moe.` and `mtp.K.block.`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F64 = np.float64


# ---------------------------------------------------------------------------------------------------------------
# Configuration (a plain description of the model; the tests write the `.dsv3` text from it)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Yarn:
    factor: float
    original_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class Config:
    vocab: int
    dim: int
    layers: int
    heads: int
    q_lora_rank: int  # 0: queries projected directly by `wq`
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    theta: float = 10000.0
    layout: str = "half"  # "half": pairs (i, i + d/2); "interleaved": pairs (2i, 2i + 1)
    yarn: Yarn | None = None
    dense_hidden: int = 0
    dense_first: int = 0
    experts: int = 0  # 0: no MoE, every layer dense
    top_k: int = 1
    expert_hidden: int = 0
    shared: int = 1
    score: str = "sigmoid"
    groups: int = 1
    keep_groups: int = 1
    route_scale: float = 1.0
    normalize: bool = True
    seq_aux: float = 0.0
    mtp_depth: int = 0
    mtp_weight: float = 0.3
    tied_head: bool = False
    norm_eps: float = 1e-6
    grad_mask: float | None = None

    @property
    def dense_layers(self) -> int:
        return self.layers if not self.experts else self.dense_first

    @property
    def moe_layers(self) -> int:
        return 0 if not self.experts else self.layers - self.dense_first


# ---------------------------------------------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------------------------------------------


def rms_norm(x, w, eps: float):
    """x / sqrt(mean(x^2) + eps) * w over the last axis."""
    x = np.asarray(x, F64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, F64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis: int = -1):
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def swiglu(gate, up):
    return silu(np.asarray(gate, F64)) * np.asarray(up, F64)


def swiglu_ffn(x, w_gate, w_up, w_down):
    return swiglu(x @ w_gate, x @ w_up) @ w_down


def yarn_mscale(scale: float, m: float) -> float:
    """mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1, else 1."""
    return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope_inv_freq(dim: int, theta: float, yarn: Yarn | None = None) -> np.ndarray:
    """Inverse frequencies theta^(-2i/d), i < d/2. With YaRN (HF `_compute_yarn_parameters`, truncate=True):
    frequency i is interpolated (divided by the factor) with weight ramp_i, extrapolated (kept) with 1 - ramp_i,
    where the ramp rises linearly from 0 at floor(dim_of(beta_fast)) to 1 at ceil(dim_of(beta_slow)) and
    dim_of(r) = d * ln(L / (2 pi r)) / (2 ln theta) is the dimension that turns r times over the original length L."""
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=F64) / dim)
    extrapolated = 1.0 / pos_freqs
    if yarn is None:
        return extrapolated
    interpolated = 1.0 / (yarn.factor * pos_freqs)

    def dim_of(rotations: float) -> float:
        return dim * math.log(yarn.original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(yarn.beta_fast)), 0)
    high = min(math.ceil(dim_of(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=F64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # the "extrapolation factor"
    return interpolated * (1.0 - keep) + extrapolated * keep


def rope_cos_sin_factor(yarn: Yarn | None) -> float:
    """HF's YaRN attention factor multiplying cos and sin: mscale(f, mscale) / mscale(f, mscale_all_dim)."""
    if yarn is None:
        return 1.0
    return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


def apply_rope(x, positions, inv_freq, layout: str, factor: float = 1.0):
    """Rotates each pair (a, b) of the last axis of x [B, S, ..., d] as the complex number a + ib times
    factor * exp(i * position * inv_freq). `half` pairs (i, i + d/2), `interleaved` pairs (2i, 2i + 1)."""
    x = np.asarray(x, F64)
    d = x.shape[-1]
    angles = np.asarray(positions, F64)[..., None] * np.asarray(inv_freq, F64)  # [B, S, d/2]
    angles = angles.reshape(*angles.shape[:2], *([1] * (x.ndim - 3)), d // 2)
    rot = factor * np.exp(1j * angles)
    out = np.empty_like(x)
    if layout == "interleaved":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    elif layout == "half":
        z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * rot
        out[..., : d // 2], out[..., d // 2 :] = z.real, z.imag
    else:
        raise ValueError(layout)
    return out


def softmax_scale(cfg: Config) -> float:
    """(nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 with YaRN."""
    scale = (cfg.nope_dim + cfg.rope_dim) ** -0.5
    if cfg.yarn is not None:
        scale *= yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) ** 2
    return scale


def attention(q_nope, q_pe, k_nope, k_pe, v, scale: float):
    """Causal attention: q_nope/k_nope [B,S,H,n], q_pe [B,S,H,r], k_pe [B,S,r] shared by all heads, v [B,S,H,dv]."""
    q_nope, q_pe, k_nope, k_pe, v = (np.asarray(a, F64) for a in (q_nope, q_pe, k_nope, k_pe, v))
    s = q_nope.shape[1]
    scores = np.einsum("bshd,bthd->bhst", q_nope, k_nope) + np.einsum("bshr,btr->bhst", q_pe, k_pe)
    scores = scores * scale
    future = np.arange(s)[None, :] > np.arange(s)[:, None]  # [query s, key t]: t > s is masked
    scores = np.where(future, -np.inf, scores)
    return np.einsum("bhst,bthd->bshd", softmax(scores, axis=-1), v)


# ---------------------------------------------------------------------------------------------------------------
# Routing, experts, losses
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Routing:
    weights: np.ndarray  # [..., k]
    indices: np.ndarray  # [..., k] int
    scores: np.ndarray  # [..., E]
    margin: float  # smallest gap at a selection boundary (groups kept vs dropped, experts chosen vs not)


def route(x, w, bias, *, score: str, top_k: int, groups: int, keep_groups: int, scale: float, normalize: bool,
          group_score: str = "top2") -> Routing:
    """DeepSeekMoE gate, token by token. Selection uses biased scores: with groups, a group's score is the sum of
    its top-2 biased scores (`group_score="max"`: its best score, DeepSeek-V2's rule), the best `keep_groups` groups
    are kept and the others' experts excluded; then the top-k biased experts. Gate weights are the unbiased scores
    of the chosen experts, divided by their sum (+1e-20) when `normalize`, times `scale`."""
    logits = np.asarray(x, F64) @ np.asarray(w, F64)
    scores = sigmoid(logits) if score == "sigmoid" else softmax(logits, axis=-1)
    lead, experts = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, experts)
    bias = np.asarray(bias, F64)
    weights = np.zeros((flat.shape[0], top_k))
    indices = np.zeros((flat.shape[0], top_k), dtype=np.int64)
    margin = math.inf
    per_group = experts // groups
    for t, s in enumerate(flat):
        biased = s + bias
        allowed = np.ones(experts, dtype=bool)
        if groups > 1:
            members = biased.reshape(groups, per_group)
            if group_score == "max":
                gscore = members.max(axis=-1)
            else:
                gscore = np.sort(members, axis=-1)[:, -2:].sum(axis=-1)
            ranked = np.argsort(-gscore, kind="stable")
            if keep_groups < groups:
                margin = min(margin, gscore[ranked[keep_groups - 1]] - gscore[ranked[keep_groups]])
            allowed = np.repeat(np.isin(np.arange(groups), ranked[:keep_groups]), per_group)
        candidates = np.where(allowed, biased, -np.inf)
        ranked = np.argsort(-candidates, kind="stable")
        chosen = ranked[:top_k]
        if top_k < allowed.sum():
            margin = min(margin, candidates[ranked[top_k - 1]] - candidates[ranked[top_k]])
        g = s[chosen]
        if normalize:
            g = g / (g.sum() + 1e-20)
        weights[t], indices[t] = g * scale, chosen
    return Routing(weights.reshape(*lead, top_k), indices.reshape(*lead, top_k), scores, margin)


def routed_experts(x, weights, indices, w_gate, w_up, w_down):
    """out[t] = sum_j weights[t, j] * SwiGLU expert indices[t, j] applied to x[t], one token at a time."""
    x = np.asarray(x, F64)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_w = np.asarray(weights, F64).reshape(len(flat_x), -1)
    flat_i = np.asarray(indices).reshape(len(flat_x), -1)
    out = np.zeros_like(flat_x)
    for t, xt in enumerate(flat_x):
        for gate, e in zip(flat_w[t], flat_i[t], strict=True):
            out[t] += gate * swiglu_ffn(xt, w_gate[e], w_up[e], w_down[e])
    return out.reshape(x.shape)


def balance_loss(scores, indices, alpha: float) -> float:
    """alpha * mean over sequences of sum_i f_i P_i, f_i = E / (k S) * #tokens of the sequence choosing expert i,
    P_i = mean over the sequence's tokens of s_i / sum_j s_j."""
    scores = np.asarray(scores, F64)
    batch, length, experts = scores.shape
    top_k = indices.shape[-1]
    total = 0.0
    for b in range(batch):
        counts = np.zeros(experts)
        for s in range(length):
            for e in indices[b, s]:
                counts[e] += 1
        f = experts / (top_k * length) * counts
        p = np.mean(scores[b] / scores[b].sum(axis=-1, keepdims=True), axis=0)
        total += float(np.sum(f * p))
    return alpha * total / batch


def expert_load(indices, experts: int) -> np.ndarray:
    """Number of (token, choice) picks of each expert."""
    load = np.zeros(experts)
    for e in np.asarray(indices).reshape(-1):
        load[e] += 1
    return load


def cross_entropy(logits, labels, mask) -> float:
    """Mean of -log softmax(logits)[label] over the tokens where mask is 1."""
    logits = np.asarray(logits, F64)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(labels)[..., None].astype(np.int64), axis=-1)[..., 0]
    mask = np.asarray(mask, F64)
    return float(np.sum(nll * mask) / max(np.sum(mask), 1.0))


def token_window(tokens, offset: int):
    """From tokens [B, T]: ids[b, i] = tokens[b, i + offset] for i < T - 1 (0 past the end) and the float mask of
    the positions that exist and whose target is in the same document (a negative token -(id + 1) starts one)."""
    tokens = np.asarray(tokens)
    batch, total = tokens.shape
    ids = np.zeros((batch, total - 1), dtype=tokens.dtype)
    mask = np.zeros((batch, total - 1))
    for b in range(batch):
        for i in range(total - 1):
            if i + offset < total:
                t = tokens[b, i + offset]
                ids[b, i] = -t - 1 if t < 0 else t
                crosses = any(tokens[b, j] < 0 for j in range(i + 1, i + offset + 1))
                mask[b, i] = 0.0 if crosses else 1.0
    return ids, mask


def grad_mask_backward(g, threshold: float):
    """The gradient mask's backward: zero each token whose feature-axis gradient RMS exceeds the threshold."""
    g = np.asarray(g, F64)
    rms = np.sqrt(np.mean(g * g, axis=-1, keepdims=True))
    return np.where(rms > threshold, 0.0, g)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def layer_slice(params: dict, prefix: str, index: int) -> dict:
    """One layer's parameters from the stacked `prefix*` arrays."""
    return {k[len(prefix):]: np.asarray(v[index], F64) for k, v in params.items() if k.startswith(prefix)}


def mla(h, p: dict, cfg: Config, positions):
    """h + MLA(rms_norm(h)) with the naive per-head keys and values."""
    batch, length, _ = h.shape
    heads, n, r, dv = cfg.heads, cfg.nope_dim, cfg.rope_dim, cfg.v_dim
    x = rms_norm(h, p["attn_norm"], cfg.norm_eps)
    if cfg.q_lora_rank:
        q = rms_norm(x @ p["wq_a"], p["q_norm"], cfg.norm_eps) @ p["wq_b"]
    else:
        q = x @ p["wq"]
    q = q.reshape(batch, length, heads, n + r)
    inv_freq, factor = rope_inv_freq(r, cfg.theta, cfg.yarn), rope_cos_sin_factor(cfg.yarn)
    q_nope = q[..., :n]
    q_pe = apply_rope(q[..., n:], positions, inv_freq, cfg.layout, factor)
    kv = x @ p["wkv_a"]
    c_kv = rms_norm(kv[..., : cfg.kv_lora_rank], p["kv_norm"], cfg.norm_eps)
    k_pe = apply_rope(kv[..., cfg.kv_lora_rank :], positions, inv_freq, cfg.layout, factor)
    kv_up = (c_kv @ p["wkv_b"]).reshape(batch, length, heads, n + dv)
    k_nope, v = kv_up[..., :n], kv_up[..., n:]
    o = attention(q_nope, q_pe, k_nope, k_pe, v, softmax_scale(cfg))
    return h + o.reshape(batch, length, heads * dv) @ p["wo"]


def layer(h, p: dict, cfg: Config, positions, kind: str):
    """Pre-norm block: attention, then dense SwiGLU or MoE. Returns (h, balance loss, expert load) (None for dense)."""
    h = mla(h, p, cfg, positions)
    x = rms_norm(h, p["ffn_norm"], cfg.norm_eps)
    if kind == "dense":
        return h + swiglu_ffn(x, p["ffn_gate"], p["ffn_up"], p["ffn_down"]), None, None
    r = route(
        x, p["router"], p["router_bias"], score=cfg.score, top_k=cfg.top_k, groups=cfg.groups,
        keep_groups=cfg.keep_groups, scale=cfg.route_scale, normalize=cfg.normalize,
    )
    y = routed_experts(x, r.weights, r.indices, p["experts_gate"], p["experts_up"], p["experts_down"])
    if cfg.shared:
        y = y + swiglu_ffn(x, p["shared_gate"], p["shared_up"], p["shared_down"])
    stats = (balance_loss(r.scores, r.indices, cfg.seq_aux), expert_load(r.indices, cfg.experts), r.margin)
    return h + y, stats, r


def forward(params: dict, tokens, cfg: Config) -> dict:
    """The training-time model on tokens [B, S+1]: logits [B, S, V] of tokens[:, :S], the LM loss against
    tokens[:, 1:], MTP module k (1-based) predicting token i+k+1 from [enorm(emb(t_{i+k})); hnorm(h_{k-1})],
    the balance losses and expert loads. Returns a dict of metrics named like the model's outputs, plus `loss`
    (their weighted sum) and `margin` (the smallest routing decision gap, to tell a well-posed test)."""
    tokens = np.asarray(tokens)
    params = {k: np.asarray(v, F64) for k, v in params.items()}
    ids = tokens[:, :-1]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    embed = params["embed"]
    head = embed.T if cfg.tied_head else params["head"]
    block_kind = "moe" if cfg.experts else "dense"
    margin = math.inf

    def run_stack(h, prefix: str, count: int, kind: str):
        nonlocal margin
        balances, loads = [], []
        for i in range(count):
            h, stats, _ = layer(h, layer_slice(params, prefix, i), cfg, positions, kind)
            if stats is not None:
                balances.append(stats[0])
                loads.append(stats[1])
                margin = min(margin, stats[2])
        return h, balances, loads

    out: dict = {}
    h = embed[ids]
    h, _, _ = run_stack(h, "dense.", cfg.dense_layers, "dense")
    loss = 0.0
    if cfg.moe_layers:
        h, balances, loads = run_stack(h, "moe.", cfg.moe_layers, "moe")
        out["balance_loss"] = sum(balances)
        out["expert_load"] = np.stack(loads)
        loss += out["balance_loss"]
    logits = rms_norm(h, params["final_norm"], cfg.norm_eps) @ head
    out["logits"] = logits
    out["lm_loss"] = cross_entropy(logits, tokens[:, 1:], np.ones(ids.shape))
    loss += out["lm_loss"]

    mtp_ce, mtp_balance, mtp_load = [], [], []
    for k in range(1, cfg.mtp_depth + 1):
        pre = f"mtp.{k - 1}."
        ids_k, _ = token_window(tokens, k)
        e = rms_norm(embed[ids_k], params[pre + "enorm"], cfg.norm_eps)
        joined = np.concatenate([e, rms_norm(h, params[pre + "hnorm"], cfg.norm_eps)], axis=-1)  # embedding first
        h = joined @ params[pre + "eh_proj"]
        h, balances, loads = run_stack(h, pre + "block.", 1, block_kind)
        logits_k = rms_norm(h, params[pre + "norm"], cfg.norm_eps) @ head
        labels, mask = token_window(tokens, k + 1)
        mtp_ce.append(cross_entropy(logits_k, labels, mask))
        if balances:
            mtp_balance.append(balances[0])
            mtp_load.append(loads[0][None])
    if mtp_ce:
        out["mtp_loss"] = float(np.mean(mtp_ce))
        loss += cfg.mtp_weight / cfg.mtp_depth * sum(mtp_ce)
    if mtp_balance:
        out["mtp_balance_loss"] = float(np.mean(mtp_balance))
        out["mtp_expert_load"] = np.mean(np.stack(mtp_load), axis=0)
        loss += sum(mtp_balance)
    out["loss"] = loss
    out["margin"] = margin
    return out
