"""DeepSeek-V3's fine-grained FP8 GEMM as a Pallas kernel for NVIDIA Hopper (Pallas's Triton backend).

out[M, N] = sum over K-blocks j (128 wide), in K order, of (A_j @ B_j in FP32) * a_scale[m, j] * b_scale[j, n],
with A FP8 [M, K] scaled per 1 x 128 tile (f32 [M, K/128]) and B FP8 [K, N] scaled per 128 x `b_block_n` block
(f32 [K/128, N/b_block_n]; 128 for weights, 1 for the weight gradient's per-column dY tiles). This is what
`runtime.fp8.blocked_matmul` computes with whole-array ops; here one program computes one [block_m, block_n] output
tile: the grid runs over (M tiles, N tiles) and the K loop is inside the kernel, the FP32 accumulator is a loop
carry (registers, never memory), each block's FP32 partial is scaled by its row x column scales and added to it (the
"promotion every 128 of K" of DeepSeek-V3, section 3.3), and the tile is cast to the output dtype once at the end.

Why Pallas's Triton backend and not Mosaic GPU (evidence from the installed jax 0.10.2):
- `jax/_src/pallas/triton/lowering.py` `_dot_general_lowering` hands the operands to `tt.dot` in their own element
  type (no widening; it only requires both operands to have the same element type) with an f32 accumulator, and
  its cast table accepts `float8_e4m3fn` from compute capability 8.9 (`_is_float8_e4m3fn_cast_supported`): an FP8
  `pl.dot` reaches Triton, which emits FP8 MMA/wgmma on sm_89/sm_90. The dot result is an ordinary register tensor,
  so the per-block scale-and-add is one line (`acc + dot * scale`), the reference's order of operations (which
  the compiler may contract into one FMA per element: XLA:CPU does in interpret mode, see the tests).
- Mosaic GPU (`jax/experimental/mosaic/gpu/wgmma.py`) does support FP8 wgmma (`_supported_wgmma_types`), but
  "Only 16-bit types support transposes": FP8 operands must be K-major in shared memory, so B (and W in dX = dY @
  W^T) would need a transposed copy or a second layout path; a wgmma accumulates into an accumulator reference, so
  per-block promotion needs a fresh accumulator per block, an explicit wait and a register copy; and operands need
  explicit SMEM swizzle/tiling transforms and a pipeline. The shipped Hopper examples
  (`experimental/pallas/ops/gpu/hopper_matmul_mgpu.py`, `ragged_dot_mgpu.py`) are 16-bit only. More machinery,
  none of which can be exercised without a GPU. The same `pallas_call`s lowered through Mosaic GPU (its default
  on CUDA, see `TRITON`) were refused on the CPU: "Async copies only support copying <=256 elements along each
  dimension", "async_copy requires all GMEM strides except the last one to be a multiple of 16 bytes" (the
  scales), "kernel exceeds available shared memory" (the whole weight stack of the grouped form).
- Costs of the choice: the Triton backend has no scalar prefetch (`lower_jaxpr_to_triton_module` raises "scalar
  prefetch not implemented in the Triton backend"), so the grouped kernel reads its tile->group table from an
  ordinary input inside the kernel and indexes the whole weight stack with it (pointer arithmetic in Triton)
  rather than through a `BlockSpec` index map; and every loaded tensor must have a power-of-two size, so tiles are
  powers of two, and scales are loaded as [block_m] / [block_n] vectors or one scalar per tile.

Entry points: `block_scaled_matmul` (the forward GEMM; `b_transposed` and `b_block_n` give the backward layouts),
`block_scaled_matmul_dx` / `block_scaled_matmul_dw` (dX = dY @ W^T and dW = X^T @ dY, tiled as
`runtime.lower.fp8._linear_bwd` tiles them), `block_scaled_grouped_matmul` (routed experts: forward, and d(rows)
with `b_transposed`) and `block_scaled_grouped_weight_grad` (the experts' dW, as `fp8.grouped_weight_grad`: each
expert's 128-row tiles are its K-blocks, walked by a loop of the expert's own length).

Operands of two different FP8 formats (an E5M2 gradient against E4M3 weights) cannot meet in one `tt.dot`: both are
widened to BF16 inside the kernel (exactly: both formats fit in BF16) and multiplied with FP32 accumulation, a BF16
tensor-core GEMM rather than an FP8 one. DeepSeek-V3's recipe (E4M3 everywhere) never takes that path.

Performance is unmeasured (no GPU here), and some choices are guesses to check on Hopper: Triton's default warps
and stages; 128 x 128 output tiles (64-row tiles for the grouped form); B read N-major in the forward pass (Hopper's
FP8 wgmma wants both operands K-major, so Triton transposes B's tile through shared memory; dX's W, read as stored,
is already K-major, which is why DeepGEMM takes its weights as [N, K]); the output written through a ref store
that, in the Triton lowering, also loads the old tile. The lowering itself is checked on the CPU (the tests lower
every entry point for CUDA and read the Triton IR back).

Shapes that are not multiples of the tiles are padded with zeros in the wrappers (M to `block_m`, N to `block_n`,
K to the 128-wide K-block; padded scales are 1) and the output is sliced back, so padding costs compute, never
correctness. `interpret=True` runs the kernels in Pallas's interpreter on any backend (the tests do, on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .. import fp8

BLOCK_K = 128
"""The K-block: the width of an activation tile and the height of a weight block, promoted every BLOCK_K."""

TRITON = plt.CompilerParams()
"""Selects the Triton backend: without compiler parameters a GPU `pallas_call` lowers through Mosaic GPU
(`jax_pallas_use_mosaic_gpu` defaults to on in jax 0.10.2, `pallas_call.py`'s GPU rule), which this kernel is not
written for. Triton's default warps and stages: unmeasured, no GPU here."""

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies
# ---------------------------------------------------------------------------------------------------------------


def _block_loop(load_a, load_b, load_a_scale, load_b_scale, blocks: int, shape: tuple[int, int],
                b_transposed: bool, widen: bool) -> jax.Array:
    """The K loop of one output tile: for each K-block, an FP8 x FP8 -> FP32 dot, times its row x column scales,
    added to the FP32 accumulator (the loop carry), in K order."""

    def body(j, acc):
        a, b = load_a(j), load_b(j)
        if widen:  # two FP8 formats: no single FP8 MMA takes them, BF16 holds both exactly
            a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        partial = plt.dot(a, b, trans_b=b_transposed)  # f32 result, f32 accumulation
        scale = load_a_scale(j)[:, None] * load_b_scale(j)[None, :]
        return acc + partial * scale

    return lax.fori_loop(0, blocks, body, jnp.zeros(shape, jnp.float32))


def _b_scale_loader(bs_ref, lead: tuple, n_tile, block_n: int, b_block_n: int, per_tile: bool):
    """K-block j -> b's scales for this program's block_n output columns, a [block_n] vector. `per_tile`: bs_ref
    holds one scale per 128 x b_block_n block (whole [.., blocks, N/b_block_n]) and b_block_n is a multiple of
    block_n, so the tile has one scale per K-block (a scalar load, broadcast); otherwise bs_ref holds one scale per
    column (whole [.., blocks, Np]). `n_tile`: the program's N tile (read at the kernel's top level, where the
    interpreter can substitute program ids)."""
    if per_tile:
        col = n_tile * block_n // b_block_n
        return lambda j: jnp.broadcast_to(bs_ref[(*lead, j, col)], (block_n,))
    n0 = pl.multiple_of(n_tile * block_n, block_n)
    return lambda j: bs_ref[(*lead, j, pl.ds(n0, block_n))]


def _dense_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, blocks: int, block_n: int, b_block_n: int,
                  per_tile: bool, b_transposed: bool, widen: bool):
    """One [block_m, block_n] tile. a_ref [block_m, Kp], as_ref [blocks, block_m] (a's scales transposed, so a
    block's row scales are one contiguous load), b_ref [Kp, block_n] (or [block_n, Kp] when `b_transposed`),
    bs_ref b's scales, whole (`_b_scale_loader`)."""

    def load_b(j):
        k0 = pl.multiple_of(j * BLOCK_K, BLOCK_K)
        return b_ref[:, pl.ds(k0, BLOCK_K)] if b_transposed else b_ref[pl.ds(k0, BLOCK_K), :]

    acc = _block_loop(
        lambda j: a_ref[:, pl.ds(pl.multiple_of(j * BLOCK_K, BLOCK_K), BLOCK_K)],
        load_b,
        lambda j: as_ref[j, :],
        _b_scale_loader(bs_ref, (), pl.program_id(1), block_n, b_block_n, per_tile),
        blocks, o_ref.shape, b_transposed, widen,
    )
    o_ref[...] = acc.astype(o_ref.dtype)


def _grouped_kernel(tg_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, blocks: int, block_n: int, b_block_n: int,
                    per_tile: bool, b_transposed: bool, widen: bool):
    """One [block_m, block_n] tile of group-aligned rows. tg_ref [tiles] (int32): the tile's group, -1 for a tile
    holding only padding (written as zeros, not computed); a_ref, as_ref as in `_dense_kernel`. b_ref is the
    whole stack [G, Kp, Np] (or [G, Np, Kp]), bs_ref its scales (`_b_scale_loader`): the tile's expert is picked
    by indexing them with its group."""
    g = tg_ref[pl.program_id(0)]
    n_tile = pl.program_id(1)
    n0 = pl.multiple_of(n_tile * block_n, block_n)

    @pl.when(g >= 0)
    def _():
        def load_b(j):
            k0 = pl.multiple_of(j * BLOCK_K, BLOCK_K)
            if b_transposed:
                return b_ref[g, pl.ds(n0, block_n), pl.ds(k0, BLOCK_K)]
            return b_ref[g, pl.ds(k0, BLOCK_K), pl.ds(n0, block_n)]

        acc = _block_loop(
            lambda j: a_ref[:, pl.ds(pl.multiple_of(j * BLOCK_K, BLOCK_K), BLOCK_K)],
            load_b,
            lambda j: as_ref[j, :],
            _b_scale_loader(bs_ref, (g,), n_tile, block_n, b_block_n, per_tile),
            blocks, o_ref.shape, b_transposed, widen,
        )
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(g < 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checks and operand preparation
# ---------------------------------------------------------------------------------------------------------------


def _check_common(a, a_scales, b, out_dtype, block_m: int, block_n: int) -> None:
    if a.ndim != 2:
        raise ValueError(f"a must be [M, K], got shape {a.shape}")
    for name, x in (("a", a), ("b", b)):
        if jnp.dtype(x.dtype) not in FP8_DTYPES:
            raise ValueError(f"{name} must be float8_e4m3fn or float8_e5m2, got {x.dtype}")
    if jnp.dtype(a_scales.dtype) != jnp.float32:
        raise ValueError(f"a_scales must be float32, got {a_scales.dtype}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    for name, t in (("block_m", block_m), ("block_n", block_n)):
        if not _is_pow2(t) or t < 16:
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {t}")
    m, k = a.shape
    if a_scales.shape != (m, math.ceil(k / BLOCK_K)):
        raise ValueError(
            f"a_scales must be [M, ceil(K/{BLOCK_K})] = {(m, math.ceil(k / BLOCK_K))} (one per 1 x {BLOCK_K} "
            f"tile of a), got {a_scales.shape}"
        )


def _b_scale_operand(
    b_scales: jax.Array, k: int, n: int, b_block_n: int, block_n: int, lead: tuple[int, ...]
) -> tuple[jax.Array, bool]:
    """Checked b scales [..., ceil(K/128), ceil(N/b_block_n)] -> (what the kernel reads, per_tile). When every
    output tile lies in one b block (b_block_n a multiple of block_n: weights' 128 x 128 blocks), the scales as
    they are; else one per output column [..., K-blocks, Np] (dY's 128 x 1 tiles are that already). Expanding
    128 x 128 block scales per column would cost 128x their size (DeepSeek-V3's 256 experts: ~117 MB a GEMM)."""
    if b_block_n < 1:
        raise ValueError(f"b_block_n must be >= 1, got {b_block_n}")
    want = (*lead, math.ceil(k / BLOCK_K), math.ceil(n / b_block_n))
    if b_scales.shape != want:
        raise ValueError(
            f"b_scales must be [{'G, ' if lead else ''}ceil(K/{BLOCK_K}), ceil(N/{b_block_n})] = {want} (one per "
            f"{BLOCK_K} x {b_block_n} block of b), got {b_scales.shape}"
        )
    if jnp.dtype(b_scales.dtype) != jnp.float32:
        raise ValueError(f"b_scales must be float32, got {b_scales.dtype}")
    if b_block_n % block_n == 0:
        return b_scales, True
    columns = jnp.repeat(b_scales, b_block_n, axis=-1)[..., :n]
    return _pad_last2(columns, columns.shape[-2], _round_up(n, block_n), 1.0), False


def _pad_last2(x: jax.Array, rows: int, cols: int, value: float = 0) -> jax.Array:
    pad = [(0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2]), (0, cols - x.shape[-1])]
    return jnp.pad(x, pad, constant_values=value)


# ---------------------------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "b_transposed", "b_block_n", "block_m", "block_n", "interpret")
)
def block_scaled_matmul(
    a: jax.Array, a_scales: jax.Array, b: jax.Array, b_scales: jax.Array, *,
    out_dtype=jnp.bfloat16, b_transposed: bool = False, b_block_n: int = 128,
    block_m: int = 128, block_n: int = 128, interpret: bool = False,
) -> jax.Array:
    """a [M, K] FP8 with scales [M, ceil(K/128)] (1 x 128 tiles) @ b [K, N] FP8 with scales [ceil(K/128),
    ceil(N/b_block_n)] (128 x b_block_n blocks) -> [M, N] in `out_dtype` (bfloat16 or float32).

    `b_transposed`: b is given as its transpose [N, K] (a weight W [K_in, N_out] used as W^T in dX = dY @ W^T is
    passed as stored, never copied); its scales are still in the logical [K-blocks, N-blocks] layout.
    `block_m` x `block_n` is the output tile of one program (powers of two); any M, N, K is padded to them."""
    _check_common(a, a_scales, b, out_dtype, block_m, block_n)
    m, k = a.shape
    if b.ndim != 2:
        raise ValueError(f"b must be 2-D, got shape {b.shape}")
    kb_, n = (b.shape[1], b.shape[0]) if b_transposed else b.shape
    if kb_ != k:
        layout = "[N, K]" if b_transposed else "[K, N]"
        raise ValueError(f"a is [M, K] = {a.shape} but b {layout} is {b.shape}: contraction sizes differ")
    bs_p, per_tile = _b_scale_operand(b_scales, k, n, b_block_n, block_n, ())
    blocks = math.ceil(k / BLOCK_K)
    mp, np_, kp = _round_up(m, block_m), _round_up(n, block_n), blocks * BLOCK_K

    a_p = _pad_last2(a, mp, kp)
    as_p = _pad_last2(a_scales, mp, blocks, 1.0).T
    b_p = _pad_last2(b, np_, kp) if b_transposed else _pad_last2(b, kp, np_)
    if b_transposed:
        b_spec = pl.BlockSpec((block_n, kp), lambda i, j: (j, 0))
    else:
        b_spec = pl.BlockSpec((kp, block_n), lambda i, j: (0, j))
    kernel = functools.partial(
        _dense_kernel, blocks=blocks, block_n=block_n, b_block_n=b_block_n, per_tile=per_tile,
        b_transposed=b_transposed, widen=a.dtype != b.dtype,
    )
    out = pl.pallas_call(
        kernel,
        grid=(mp // block_m, np_ // block_n),
        in_specs=[
            pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((blocks, block_m), lambda i, j: (0, i)),
            b_spec,
            pl.no_block_spec,  # b's scales, whole: a few per tile and K-block
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=interpret,
        compiler_params=TRITON,
        name="fp8_block_scaled_matmul",
    )(a_p, as_p, b_p, bs_p)
    return out[:m, :n]


def block_scaled_matmul_dx(
    g: jax.Array, g_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
    out_dtype=jnp.bfloat16, interpret: bool = False, **tiles: int,
) -> jax.Array:
    """The input gradient of y = x @ w: dX = dY @ W^T, as `runtime.lower.fp8._linear_bwd` tiles it. g (dY) [M, N]
    FP8 per 1 x 128 tile, scales [M, ceil(N/128)]; w [K, N] FP8 as stored (the forward's weight), w_scales its
    128 x 128 block scales [ceil(K/128), ceil(N/128)]. W^T's blocks are W's, transposed: no requantisation, and
    the weight is read in place (`b_transposed`)."""
    return block_scaled_matmul(
        g, g_scales, w, w_scales.T, out_dtype=out_dtype, b_transposed=True, interpret=interpret, **tiles
    )


def block_scaled_matmul_dw(
    xt: jax.Array, xt_scales: jax.Array, g: jax.Array, g_scales: jax.Array, *,
    out_dtype=jnp.float32, interpret: bool = False, **tiles: int,
) -> jax.Array:
    """The weight gradient of y = x @ w: dW = X^T @ dY, as `_linear_bwd` tiles it: the contraction runs over
    tokens, so xt (X^T) [K, M] is FP8 per 1 x 128 tile along tokens (scales [K, ceil(M/128)]) and g (dY) [M, N]
    per 128 x 1 tile (scales [ceil(M/128), N], one per column and token block)."""
    return block_scaled_matmul(
        xt, xt_scales, g, g_scales, out_dtype=out_dtype, b_block_n=1, interpret=interpret, **tiles
    )


# ---------------------------------------------------------------------------------------------------------------
# Grouped (routed experts)
# ---------------------------------------------------------------------------------------------------------------


def _tile_table(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """(destination of each row in the group-aligned layout, or `total` for a row past the groups; group of each
    row tile, -1 for a tile of padding only; validity of each row; `total` padded rows). Built on
    `fp8.group_aligned_rows`: every group starts on a tile boundary, so a tile belongs to one expert."""
    dest, tile_group, total = fp8.group_aligned_rows(group_sizes, rows, block_m)
    valid = jnp.arange(rows) < jnp.sum(group_sizes)
    dest = jnp.where(valid, dest, total)
    used_tiles = jnp.sum((group_sizes + block_m - 1) // block_m)
    tile_group = jnp.where(jnp.arange(total // block_m) < used_tiles, tile_group, -1).astype(jnp.int32)
    return dest, tile_group, valid, total


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "b_transposed", "b_block_n", "block_m", "block_n", "interpret")
)
def block_scaled_grouped_matmul(
    a: jax.Array, a_scales: jax.Array, b: jax.Array, b_scales: jax.Array, group_sizes: jax.Array, *,
    out_dtype=jnp.bfloat16, b_transposed: bool = False, b_block_n: int = 128,
    block_m: int = 64, block_n: int = 128, interpret: bool = False,
) -> jax.Array:
    """Grouped (MoE) block-scaled GEMM: rows a [T, K] FP8 sorted by group (scales [T, ceil(K/128)]), group g's
    rows multiplied by b[g] [K, N] FP8 (scales [G, ceil(K/128), ceil(N/b_block_n)]) -> [T, N] in `out_dtype`;
    rows past sum(group_sizes) are zero (as `lax.ragged_dot`). `b_transposed`: b is given as [G, N, K] (the
    expert weights as stored, for d(rows) = dY @ W_g^T); scales stay in the logical layout.

    Each group's rows are moved to whole `block_m`-row tiles (`fp8.group_aligned_rows`), so every tile belongs to
    one expert; the kernel reads the tile's expert from a tile->group table and indexes the weight stack with it.
    Tiles of padding only (the layout reserves up to G - 1 more tiles than the rows need) are written as zeros
    without a GEMM. A small `block_m` wastes less on small groups (DeepSeek-V3: 256 experts, few rows each)."""
    _check_common(a, a_scales, b, out_dtype, block_m, block_n)
    rows, k = a.shape
    if b.ndim != 3:
        raise ValueError(f"b must be [G, K, N] (or [G, N, K] transposed), got shape {b.shape}")
    groups = b.shape[0]
    kb_, n = (b.shape[2], b.shape[1]) if b_transposed else b.shape[1:]
    if kb_ != k:
        layout = "[G, N, K]" if b_transposed else "[G, K, N]"
        raise ValueError(f"a is [T, K] = {a.shape} but b {layout} is {b.shape}: contraction sizes differ")
    if group_sizes.shape != (groups,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers [G] = [{groups}], got {group_sizes.dtype}{group_sizes.shape}")
    bs_p, per_tile = _b_scale_operand(b_scales, k, n, b_block_n, block_n, (groups,))
    blocks = math.ceil(k / BLOCK_K)
    np_, kp = _round_up(n, block_n), blocks * BLOCK_K

    dest, tile_group, valid, total = _tile_table(group_sizes.astype(jnp.int32), rows, block_m)
    a_p = jnp.zeros((total, kp), a.dtype).at[dest, :k].set(a, mode="drop")
    as_p = jnp.ones((total, blocks), jnp.float32).at[dest].set(a_scales, mode="drop").T
    b_p = _pad_last2(b, np_, kp) if b_transposed else _pad_last2(b, kp, np_)
    kernel = functools.partial(
        _grouped_kernel, blocks=blocks, block_n=block_n, b_block_n=b_block_n, per_tile=per_tile,
        b_transposed=b_transposed, widen=a.dtype != b.dtype,
    )
    out = pl.pallas_call(
        kernel,
        grid=(total // block_m, np_ // block_n),
        in_specs=[
            pl.no_block_spec,  # tile -> group table, read by the kernel (no scalar prefetch on Triton)
            pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((blocks, block_m), lambda i, j: (0, i)),
            pl.no_block_spec,  # the whole weight stack, indexed by the tile's group
            pl.no_block_spec,
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((total, np_), out_dtype),
        interpret=interpret,
        compiler_params=TRITON,
        name="fp8_block_scaled_grouped_matmul",
    )(tile_group, a_p, as_p, b_p, bs_p)
    gathered = out[jnp.minimum(dest, total - 1), :n]
    return jnp.where(valid[:, None], gathered, jnp.zeros((), out_dtype))


def _grouped_wgrad_kernel(start_ref, count_ref, x_ref, xs_ref, g_ref, gs_ref, o_ref, *, block_m: int, block_n: int):
    """One [block_m, block_n] tile of expert e's dW = x_e^T @ g_e, contracting over the expert's row tiles of
    BLOCK_K rows (its K-blocks): x_ref [rows, Kp] and g_ref [rows, Np] whole (group-aligned rows), xs_ref
    [tiles, Kp] and gs_ref [tiles, Np] their per-(BLOCK_K x 1) scales, start_ref/count_ref [G] each expert's first
    tile and tile count (a loop of dynamic length: an empty expert's gradient is zero)."""
    e = pl.program_id(0)
    k0 = pl.multiple_of(pl.program_id(1) * block_m, block_m)
    n0 = pl.multiple_of(pl.program_id(2) * block_n, block_n)
    first = start_ref[e]

    def body(t, acc):
        tile = first + t
        r0 = pl.multiple_of(tile * BLOCK_K, BLOCK_K)
        x = x_ref[pl.ds(r0, BLOCK_K), pl.ds(k0, block_m)]
        g = g_ref[pl.ds(r0, BLOCK_K), pl.ds(n0, block_n)]
        if x.dtype != g.dtype:
            x, g = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
        partial = plt.dot(x, g, trans_a=True)
        scale = xs_ref[tile, pl.ds(k0, block_m)][:, None] * gs_ref[tile, pl.ds(n0, block_n)][None, :]
        return acc + partial * scale

    acc = lax.fori_loop(0, count_ref[e], body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "interpret"))
def block_scaled_grouped_weight_grad(
    x: jax.Array, x_scales: jax.Array, g: jax.Array, g_scales: jax.Array, group_sizes: jax.Array, *,
    out_dtype=jnp.float32, block_m: int = 128, block_n: int = 128, interpret: bool = False,
) -> jax.Array:
    """The experts' weight gradient dW[e] = x_e^T @ g_e -> [G, K, N], as `fp8.grouped_weight_grad` computes it:
    x [R, K] and g [R, N] FP8 in the group-aligned layout of `fp8.group_aligned_rows(group_sizes, rows, 128)`
    (each group's rows padded with zero rows to whole 128-row tiles, in group order, zero tiles after), scaled per
    128 x 1 tile: x_scales [R/128, K], g_scales [R/128, N]. The contraction runs over each expert's own tiles, one
    K-block per tile, in order. `block_m` x `block_n` tiles the [K, N] output of each expert."""
    for name, v in (("x", x), ("g", g)):
        if v.ndim != 2 or jnp.dtype(v.dtype) not in FP8_DTYPES:
            raise ValueError(f"{name} must be a 2-D float8_e4m3fn/float8_e5m2 array, got {v.dtype}{v.shape}")
    rows, k = x.shape
    n = g.shape[1]
    if g.shape[0] != rows or rows % BLOCK_K:
        raise ValueError(
            f"x [R, K] = {x.shape} and g [R, N] = {g.shape} must share R, a whole number of {BLOCK_K}-row tiles "
            "(the group-aligned layout of fp8.group_aligned_rows)"
        )
    tiles = rows // BLOCK_K
    for name, s, want in (("x_scales", x_scales, (tiles, k)), ("g_scales", g_scales, (tiles, n))):
        if s.shape != want or jnp.dtype(s.dtype) != jnp.float32:
            raise ValueError(f"{name} must be float32 [R/{BLOCK_K}, cols] = {want}, got {s.dtype}{s.shape}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    for name, t in (("block_m", block_m), ("block_n", block_n)):
        if not _is_pow2(t) or t < 16:
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {t}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers [G], got {group_sizes.dtype}{group_sizes.shape}")
    groups = group_sizes.shape[0]
    counts = ((group_sizes.astype(jnp.int32) + BLOCK_K - 1) // BLOCK_K).astype(jnp.int32)
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    kp, np_ = _round_up(k, block_m), _round_up(n, block_n)
    kernel = functools.partial(_grouped_wgrad_kernel, block_m=block_m, block_n=block_n)
    out = pl.pallas_call(
        kernel,
        grid=(groups, kp // block_m, np_ // block_n),
        in_specs=[pl.no_block_spec] * 6,  # whole arrays: each program walks its expert's row tiles
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda e, i, j: (e, i, j)),
        out_shape=jax.ShapeDtypeStruct((groups, kp, np_), out_dtype),
        interpret=interpret,
        compiler_params=TRITON,
        name="fp8_block_scaled_grouped_weight_grad",
    )(
        starts, counts,
        _pad_last2(x, rows, kp), _pad_last2(x_scales, tiles, kp, 1.0),
        _pad_last2(g, rows, np_), _pad_last2(g_scales, tiles, np_, 1.0),
    )
    return out[:, :k, :n]
