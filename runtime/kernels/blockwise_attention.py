"""Blockwise (flash-style) causal MLA attention in plain JAX, for XLA:CPU.

`mla_attention` (runtime/lower/attention.py) materialises the [B, H, S, T] float32 scores, the probabilities and,
under autodiff, their cotangents: 4 GiB per tensor at S = T = 8192 with 16 heads. This form walks the sequence in
query x key tiles with an online softmax, so nothing grows as S x T (the largest temporaries are one
[B, H, block_q, block_k] tile of scores and O(S) re-laid-out copies of the operands), and it skips the tiles that
the causal mask removes entirely (about half of them).

The derivative is a `jax.custom_vjp` in the FlashAttention-2 manner: the forward keeps only the output and each
row's log-sum-exp, and the backward recomputes every tile's probabilities from them. Autodiff through the loops
would instead save every tile's probabilities, which is the S x T memory this kernel exists to avoid, and
`fori_loop` with a data-dependent trip count is not reverse-differentiable at all.

Layout: the rope key (one per position, shared by all heads) is broadcast to the heads and concatenated with the
per-head key, and likewise q_pe with q_nope, so each tile's scores are one batched GEMM over all heads with
contraction n + r instead of two GEMMs and a head reduction; the broadcast costs O(T) memory, not O(S x T). All
operands are laid out [blocks, B, H, block, features] once, up front, so a tile is a contiguous leading-axis slice
and every GEMM is in XLA's canonical batch-major form.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from .slicing import dynamic_index

F32 = jnp.float32

RESIDUALS = ("blockwise_attention.out", "blockwise_attention.lse")
"""Names of what the forward keeps for the backward, for a recompute policy to save (`dsv3-remat{kernels=attention}`)
rather than run the forward again."""

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 128
MIN_BLOCK = 64


def default_blocks(s: int) -> tuple[int, int]:
    """(block_q, block_k) for `s` queries: about four query blocks, between 64 and 256 rows, and key blocks half as
    wide (at least 64). Short sequences need small tiles for the causal skip to pay: at S = 256 one 256-row query
    block sees every key tile, so nothing is skipped. Long ones want few loop trips. Measured on a 2-core AMD EPYC
    (XLA:CPU, float32, n=64, r=32, dv=64, forward + backward, `benchmarks/attention_cpu.py`): at S = 256 (32 heads)
    64 x 64 tiles took 50-61 ms against 86-107 ms for 256 x 128; at S = 512 64 x 64, 128 x 128 and 256 x 128 were
    within 10% (233 / 246 / 256 ms); at S = 1024 and 2048 (16 heads) 256 x 128 was the fastest or level (321 and
    1,091 ms, 64 x 64: 332 and 1,179). Tiles of 512 x 512 and above were 20-60% slower at S = 2048 (a [H, 512, 512]
    float32 tile is 16 MiB, far past the caches)."""
    block_q = min(DEFAULT_BLOCK_Q, max(MIN_BLOCK, s // 4))
    return block_q, min(DEFAULT_BLOCK_K, max(MIN_BLOCK, block_q // 2))


@dataclass(frozen=True)
class _Tiling:
    """Block geometry of one call: sizes, padded block counts, and the causal loop bounds per block.

    Query s sees key t iff t <= s + offset (offset = T - S, the cached prefix) and t < T (padding keys are never
    seen). Padding query rows (s >= S) compute garbage that is sliced off; they still see key 0, so every row's
    running maximum is finite after its first tile and the online softmax never forms inf - inf.
    """

    s: int
    t: int
    bq: int
    bk: int

    @property
    def offset(self) -> int:
        return self.t - self.s

    @property
    def nq(self) -> int:
        return -(-self.s // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.t // self.bk)

    def key_end(self, i: jax.Array) -> jax.Array:
        """One past the last key block that any row of query block i sees."""
        last_key = (i + 1) * self.bq - 1 + self.offset
        return jnp.minimum(last_key // self.bk + 1, self.nk)

    def query_start(self, j: jax.Array) -> jax.Array:
        """The first query block in which some row sees a key of key block j."""
        return jnp.clip((j * self.bk - self.offset) // self.bq, 0, self.nq)

    def mask(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """[bq, bk] visibility of tile (i, j)."""
        rows = i * self.bq + jnp.arange(self.bq)[:, None]
        cols = j * self.bk + jnp.arange(self.bk)[None, :]
        return (cols <= rows + self.offset) & (cols < self.t)


def _blocks(x: jax.Array, block: int, count: int) -> jax.Array:
    """[B, L, H, d] -> [count, B, H, block, d], zero-padded along L."""
    b, length, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, count * block - length), (0, 0), (0, 0)))
    return x.reshape(b, count, block, h, d).transpose(1, 0, 3, 2, 4)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
    """[count, B, H, block, d] -> [B, length, H, d], dropping the padding."""
    count, b, h, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, count * block, h, d)[:, :length]


def _rows(x: jax.Array, block: int, count: int) -> jax.Array:
    """Per-row statistics [B, L, H] -> [count, B, H, block], zero-padded."""
    return _blocks(x[..., None], block, count)[..., 0]


def _keys(k_nope: jax.Array, k_pe: jax.Array) -> jax.Array:
    """[B, T, H, n + r]: the shared rope key broadcast to every head, next to the per-head key."""
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1])).astype(k_nope.dtype)
    return jnp.concatenate([k_nope, k_pe], axis=-1)


def _scores(q: jax.Array, k: jax.Array, scale: float, mask: jax.Array) -> jax.Array:
    """One tile's scaled float32 scores [B, H, bq, bk], -inf where masked.

    Every visited tile is masked, even those wholly visible: the compare and select fuse into the elementwise pass
    that follows the GEMM, and measured no slower than a separate unmasked loop, at half the code.
    """
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * scale
    return jnp.where(mask, s, -jnp.inf)


def _forward(q_nope, q_pe, k_nope, k_pe, v, scale: float, tiling: _Tiling) -> tuple[jax.Array, jax.Array]:
    """The output [B, S, H, dv] and the blocked row log-sum-exp [nq, B, H, bq]."""
    qb = _blocks(jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1), tiling.bq, tiling.nq)
    kb = _blocks(_keys(k_nope, k_pe), tiling.bk, tiling.nk)
    vb = _blocks(v, tiling.bk, tiling.nk)
    _, b, h, bq, _ = qb.shape

    def query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        q = dynamic_index(qb, i)

        def tile(j: jax.Array, carry):
            m, denom, acc = carry
            s = _scores(q, dynamic_index(kb, j), scale, tiling.mask(i, j))
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkv->bhqv", p.astype(v.dtype), dynamic_index(vb, j), preferred_element_type=F32)
            return m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + pv

        carry = (jnp.full((b, h, bq), -jnp.inf, F32), jnp.zeros((b, h, bq), F32),
                 jnp.zeros((b, h, bq, v.shape[-1]), F32))
        m, denom, acc = lax.fori_loop(0, tiling.key_end(i), tile, carry)
        return (acc / denom[..., None]).astype(v.dtype), m + jnp.log(denom)

    out, lse = lax.map(query_block, jnp.arange(tiling.nq))
    return _unblocks(out, tiling.s), lse


def _backward(q_nope, q_pe, k_nope, k_pe, v, out, lse, d_out, scale: float, tiling: _Tiling):
    """FlashAttention-2 backward: per key block, walk the query blocks that see it, recomputing probabilities.

    dK and dV of the key block accumulate in the inner loop's carry; dQ is one float32 buffer over all query
    blocks, updated in place a tile at a time.

    Each tile works on the transposed scores [B, H, bk, bq] (key-major), so that the three GEMMs that contract the
    tile take row-major operands: dV = P^T dO and dK = dS^T Q read the tile as it is, and dQ^T = K^T dS^T reads K^T,
    transposed once per call, and accumulates dQ transposed. Contracting the query axis of a query-major tile is a
    transposed left operand, which XLA:CPU runs slower in float32 and, for bf16 operands, widens to float32 and hands
    to its generic dot: on the 34M-parameter peer model those two GEMMs took 58 ms of thread time per bf16 train step
    (XLA's profile).
    """
    n = q_nope.shape[-1]
    qb = _blocks(jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1), tiling.bq, tiling.nq)
    kb = _blocks(_keys(k_nope, k_pe), tiling.bk, tiling.nk)
    k_t = lax.optimization_barrier(jnp.swapaxes(kb, -1, -2))  # [nk, B, H, d, bk], its own row-major array
    vb = _blocks(v, tiling.bk, tiling.nk)
    dob = _blocks(d_out, tiling.bq, tiling.nq)
    delta = _rows(jnp.einsum("bshv,bshv->bsh", d_out.astype(F32), out.astype(F32)), tiling.bq, tiling.nq)
    _, b, h, bk, d = kb.shape

    def key_block(dq_t: jax.Array, j: jax.Array):
        k, vj = dynamic_index(kb, j), dynamic_index(vb, j)

        def tile(i: jax.Array, carry):
            dq_t, dk, dv = carry
            q, do = dynamic_index(qb, i), dynamic_index(dob, i)
            s_t = jnp.einsum("bhkd,bhqd->bhkq", k, q, preferred_element_type=F32) * scale
            s_t = jnp.where(tiling.mask(i, j).T, s_t, -jnp.inf)
            p_t = jnp.exp(s_t - lse[i][..., None, :])
            dv = dv + jnp.einsum("bhkq,bhqv->bhkv", p_t.astype(do.dtype), do, preferred_element_type=F32)
            dp_t = jnp.einsum("bhkv,bhqv->bhkq", vj, do, preferred_element_type=F32)
            ds_t = (p_t * (dp_t - delta[i][..., None, :]) * scale).astype(q.dtype)
            dk = dk + jnp.einsum("bhkq,bhqd->bhkd", ds_t, q, preferred_element_type=F32)
            dq_i = lax.dynamic_index_in_dim(dq_t, i, keepdims=False)
            dq_i = dq_i + jnp.einsum("bhdk,bhkq->bhdq", dynamic_index(k_t, j), ds_t, preferred_element_type=F32)
            return lax.dynamic_update_index_in_dim(dq_t, dq_i, i, 0), dk, dv

        carry = (dq_t, jnp.zeros((b, h, bk, d), F32), jnp.zeros((b, h, bk, v.shape[-1]), F32))
        dq_t, dk, dv = lax.fori_loop(tiling.query_start(j), tiling.nq, tile, carry)
        return dq_t, (dk, dv)

    dq_shape = (tiling.nq, b, h, d, tiling.bq)
    dq_t, (dk, dv) = lax.scan(key_block, jnp.zeros(dq_shape, F32), jnp.arange(tiling.nk))
    dq, dk = _unblocks(jnp.swapaxes(dq_t, -1, -2), tiling.s), _unblocks(dk, tiling.t)
    return (dq[..., :n].astype(q_nope.dtype), dq[..., n:].astype(q_pe.dtype), dk[..., :n].astype(k_nope.dtype),
            dk[..., n:].sum(2).astype(k_pe.dtype), _unblocks(dv, tiling.t).astype(v.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q_nope, q_pe, k_nope, k_pe, v, scale: float, tiling: _Tiling) -> jax.Array:
    return _forward(q_nope, q_pe, k_nope, k_pe, v, scale, tiling)[0]


def _attention_fwd(q_nope, q_pe, k_nope, k_pe, v, scale: float, tiling: _Tiling):
    out, lse = (checkpoint_name(x, name) for x, name in zip(
        _forward(q_nope, q_pe, k_nope, k_pe, v, scale, tiling), RESIDUALS, strict=True))
    return out, (q_nope, q_pe, k_nope, k_pe, v, out, lse)


def _attention_bwd(scale: float, tiling: _Tiling, residuals, d_out):
    return _backward(*residuals, d_out, scale, tiling)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_nope: jax.Array, q_pe: jax.Array, k_nope: jax.Array, k_pe: jax.Array, v: jax.Array,
                        scale: float, *, block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Causal MLA attention, the semantics of `mla_attention`, computed tile by tile.

    q_nope [B, S, H, n], q_pe [B, S, H, r], k_nope [B, T, H, n], k_pe [B, T, r] (one rope key for all heads),
    v [B, T, H, dv] -> [B, S, H, dv] in v's dtype. Query s sees keys t <= s + (T - S); T >= S is required, since
    otherwise the first rows see no key and their softmax is undefined. Scores and softmax statistics are float32.
    Blocks larger than the sequence shrink to it; sequences that are not a multiple of the block are padded and
    masked. Blocks not given are `default_blocks(S)`.
    """
    b, s, h, n = q_nope.shape
    t = k_nope.shape[1]
    if q_pe.shape[:3] != (b, s, h) or k_nope.shape != (b, t, h, n) or k_pe.shape[:2] != (b, t):
        raise ValueError(f"inconsistent shapes: q_nope {q_nope.shape}, q_pe {q_pe.shape}, k_nope {k_nope.shape}, "
                         f"k_pe {k_pe.shape}")
    if k_pe.shape[-1] != q_pe.shape[-1] or v.shape[:3] != (b, t, h):
        raise ValueError(f"inconsistent shapes: q_pe {q_pe.shape}, k_pe {k_pe.shape}, v {v.shape}")
    if t < s:
        raise ValueError(f"keys ({t}) must cover the queries ({s}): the first {s - t} rows would see no key")
    default_q, default_k = default_blocks(s)
    block_q = default_q if block_q is None else block_q
    block_k = default_k if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q} x {block_k}")
    return _attention(q_nope, q_pe, k_nope, k_pe, v, float(scale), _Tiling(s, t, min(block_q, s), min(block_k, t)))
