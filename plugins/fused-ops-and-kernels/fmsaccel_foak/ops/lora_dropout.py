"""LoRA's dropout drawn inside the rank-r matmuls, from a counter-based RNG: no mask is stored.

Element ``(m, k)`` of the ``[M, K]`` input is kept when its 16-bit random word is at least
``round(p * 65536)`` (so the keep probability is ``1 - p`` to within 2^-17). The words come from
Philox (counter-based: the same draw for the same seed and counter, on any launch), one draw of
four 32-bit words per eight consecutive elements of a row, counter ``m * ceil(K / 8) + k // 8``.
One draw per element, as ``tl.rand`` makes, cost eight times the memory traffic of the kernels
on an H200 (s15c1: 0.28 ms where reading the input takes 0.033). So the forward's
``(x * keep) @ A^T`` and the backward's ``dA = dxa^T @ (x * keep)`` and
``dx += (dxa @ A) * keep`` regenerate the mask where they read ``x`` or write ``dx``.
Against the torch path of :mod:`.lora` (a ``bernoulli_`` mask kept per projection, then
``x * mask`` before each small matmul and ``* mask`` after one in the backward) this saves
the mask's memory (one input-sized tensor per projection and layer) and four of the
memory passes over input-sized tensors per projection.

Each projection draws its own int64 seed from torch's generator in the forward
(``draw_seed``), so checkpoint recompute, which restores the RNG state, replays the same
masks. The ``1 / (1 - p)`` rescale stays folded into the LoRA scaling, as in :mod:`.lora`.
The stream is not PEFT's (nor the torch path's). :func:`keep_mask` materialises the mask
the kernels draw, for tests.

Projections that read the same ``x`` (q/k/v, gate/up) share each launch through the ``*_multi``
ops (up to ``MAX_PROJECTIONS``, one rank and one ``p``): each ``x`` tile is read once, and
``dx`` read and written once, for all of them, while every projection still draws its own mask from
its own seed (exactly the mask of its own launch: the single-projection ops run the same kernels
with one projection); three projections read ``x`` three times otherwise, a pass of ~0.035 ms
each at workload P on an H200.

The launchers are ``torch.library`` custom ops with shape-only fake implementations,
so a compiled decoder layer (``compile_layers``) keeps each as one opaque node instead of
Dynamo tracing the kernel launches (which failed on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fmsaccel_framework.triton_utils import exact_fp32_dot, is_interpreted

from ..runtime import can_launch

MAX_ELEMENTS = 2**31 - 1  # the Philox counters and keep_mask's element offsets are int32
TARGET_PROGRAMS = 512  # the weight gradient's grid: about four programs per SM of an H100 (132)
SPLIT_MIN_ROWS = 2048  # rows a weight-gradient program walks at least (fewer: partial sums cost more than they save)
MAX_PROJECTIONS = 3  # projections one ``*_multi`` launch takes (q/k/v: three accumulators); more: one launch each
# Philox4x32 rounds a draw. Triton's default, 10, is its authors' choice with a safety margin; 7 is the fewest they
# found to pass TestU01's BigCrush (Salmon et al., SC'11). A dropout mask needs no more, and the kernels spend
# most of their time drawing (s18c4: three projections in one launch cost 2.5x one), so 3 rounds fewer are ~30 %
# fewer draw instructions. ``tests/test_foak_lora.py`` checks the masks against a numpy Philox of these rounds.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _halves(word):
    return tl.join(word & 0xFFFF, (word >> 16) & 0xFFFF)


@triton.jit
def _keep(seed, rows, col0, n_cols, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          ROUNDS: tl.constexpr = PHILOX_ROUNDS):
    """``keep`` over ``rows`` x ``[col0, col0 + BLOCK_K)`` (``col0`` and ``BLOCK_K`` multiples of 8).

    Every kernel draws through here, so the order in which the eight 16-bit halves of a draw
    are spread over its eight columns (whatever ``join``/``reshape`` make of it) is the same
    everywhere.
    """
    groups = (n_cols + 7) // 8
    counters = rows[:, None] * groups + (col0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters.to(tl.int32), ROUNDS)
    words = tl.join(tl.join(_halves(w0), _halves(w1)), tl.join(_halves(w2), _halves(w3)))
    return tl.reshape(words, (BLOCK_M, BLOCK_K)).to(tl.int32) >= threshold


@triton.jit
def _tile(X, rows, col0, n_rows, n_cols, stride_x, BLOCK_K: tl.constexpr):
    """The ``[rows, col0:col0 + BLOCK_K]`` tile of ``x`` (zeros outside the matrix)."""
    cols = col0 + tl.arange(0, BLOCK_K)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _rows_by_rank(T, rows, ranks, n_rows, rank, stride):
    """The ``[rows, :R]`` tile of a ``[M, rank]`` matrix (zeros past ``rank``)."""
    return tl.load(T + rows[:, None].to(tl.int64) * stride + ranks[None, :],
                   mask=(rows < n_rows)[:, None] & (ranks < rank)[None, :], other=0.0)


@triton.jit(do_not_specialize=["n_rows"])
def _keep_mask_kernel(OUT, SEED, n_rows, n_cols, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    keep = _keep(tl.load(SEED), rows, col0, n_cols, threshold, BLOCK_M, BLOCK_K)
    tl.store(OUT + rows[:, None] * n_cols + cols[None, :], keep.to(OUT.dtype.element_ty), mask=mask)


# --- the kernels: one launch serves every projection reading the same x (q/k/v, gate/up; one projection is
# the plain case), reading each x (or dx) tile once and drawing each projection's own mask on it; up to
# MAX_PROJECTIONS accumulators, the unused ones compiled out


@triton.jit
def _seeds(SEEDS, NPROJ: tl.constexpr):
    """The three projections' seeds (the first one stands in past ``NPROJ``: those slots go unused)."""
    tl.static_assert(NPROJ <= 3, "three accumulators at most (MAX_PROJECTIONS)")
    seed0 = tl.load(SEEDS)
    seed1 = seed0
    seed2 = seed0
    if NPROJ > 1:
        seed1 = tl.load(SEEDS + 1)
    if NPROJ > 2:
        seed2 = tl.load(SEEDS + 2)
    return seed0, seed1, seed2


@triton.jit
def _down_part(x, A, seed, rows, col0, n_cols, rank, stride_a, threshold, acc, R: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + (x * keep) @ A^T`` over one block of columns, for one projection."""
    cols = col0 + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R)
    a = tl.load(A + ranks[None, :] * stride_a + cols[:, None], mask=(cols < n_cols)[:, None] & (ranks < rank)[None, :],
                other=0.0)
    keep = _keep(seed, rows, col0, n_cols, threshold, BLOCK_M, BLOCK_K)
    return _dot(tl.where(keep, x, 0.0), a, acc, DOT_FP32)


@triton.jit
def _weight_grad_part(x, DXA, seed, rows, col0, n_rows, n_cols, rank, stride_dxa, threshold, acc, R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + dxa^T @ (x * keep)`` over one block of rows, for one projection."""
    dxa = _rows_by_rank(DXA, rows, tl.arange(0, R), n_rows, rank, stride_dxa)
    keep = _keep(seed, rows, col0, n_cols, threshold, BLOCK_M, BLOCK_K)
    return _dot(tl.trans(dxa.to(x.dtype)), tl.where(keep, x, 0.0), acc, DOT_FP32)


@triton.jit
def _input_grad_part(DXA, A, seed, rows, col0, n_rows, n_cols, rank, stride_dxa, stride_a, threshold, acc,
                     R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + (dxa @ A) * keep`` over one tile, for one projection."""
    cols = col0 + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R)
    dxa = _rows_by_rank(DXA, rows, ranks, n_rows, rank, stride_dxa)
    a = tl.load(A + ranks[:, None] * stride_a + cols[None, :], mask=(ranks < rank)[:, None] & (cols < n_cols)[None, :],
                other=0.0)
    part = _dot(dxa, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32)
    return acc + tl.where(_keep(seed, rows, col0, n_cols, threshold, BLOCK_M, BLOCK_K), part, 0.0)


@triton.jit(do_not_specialize=["n_rows"])
def _dropped_down_kernel(X, A, OUT, SEEDS, n_rows, n_cols, rank, stride_x, stride_ap, stride_a, stride_op,
                         stride_o, threshold, NPROJ: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``OUT[j, m, :rank] = sum_k x[m, k] * keep_j(m, k) * A[j, :rank, k]`` for each projection ``j``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R)
    seed0, seed1, seed2 = _seeds(SEEDS, NPROJ)
    acc0 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    for k0 in range(0, n_cols, BLOCK_K):
        x = _tile(X, rows, k0, n_rows, n_cols, stride_x, BLOCK_K)
        acc0 = _down_part(x, A, seed0, rows, k0, n_cols, rank, stride_a, threshold, acc0, R, BLOCK_M, BLOCK_K,
                          DOT_FP32)
        if NPROJ > 1:
            acc1 = _down_part(x, A + stride_ap, seed1, rows, k0, n_cols, rank, stride_a, threshold, acc1, R, BLOCK_M,
                              BLOCK_K, DOT_FP32)
        if NPROJ > 2:
            acc2 = _down_part(x, A + 2 * stride_ap, seed2, rows, k0, n_cols, rank, stride_a, threshold, acc2, R,
                              BLOCK_M, BLOCK_K, DOT_FP32)
    out = OUT + rows[:, None].to(tl.int64) * stride_o + ranks[None, :]
    inside = (rows < n_rows)[:, None] & (ranks < rank)[None, :]
    tl.store(out, acc0.to(OUT.dtype.element_ty), mask=inside)
    if NPROJ > 1:
        tl.store(out + stride_op, acc1.to(OUT.dtype.element_ty), mask=inside)
    if NPROJ > 2:
        tl.store(out + 2 * stride_op, acc2.to(OUT.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["n_rows", "rows_per_split"])
def _dropped_weight_grad_kernel(DXA, X, DA, SEEDS, n_rows, n_cols, rank, rows_per_split, stride_dxap,
                                stride_dxa, stride_x, stride_split, stride_dap, stride_da, threshold,
                                NPROJ: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``DA[split, j, :rank, k] = sum_m dxa[j, m, :rank] * x[m, k] * keep_j(m, k)`` (fp32) for each projection
    ``j``, one block of columns and the rows of one split (a multiple of ``BLOCK_M``: no tile straddles two)."""
    col0 = tl.program_id(0) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    seed0, seed1, seed2 = _seeds(SEEDS, NPROJ)
    acc0 = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    start = split * rows_per_split
    for m0 in range(start, tl.minimum(start + rows_per_split, n_rows), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = _tile(X, rows, col0, n_rows, n_cols, stride_x, BLOCK_K)
        acc0 = _weight_grad_part(x, DXA, seed0, rows, col0, n_rows, n_cols, rank, stride_dxa, threshold, acc0, R,
                                 BLOCK_M, BLOCK_K, DOT_FP32)
        if NPROJ > 1:
            acc1 = _weight_grad_part(x, DXA + stride_dxap, seed1, rows, col0, n_rows, n_cols, rank, stride_dxa,
                                     threshold, acc1, R, BLOCK_M, BLOCK_K, DOT_FP32)
        if NPROJ > 2:
            acc2 = _weight_grad_part(x, DXA + 2 * stride_dxap, seed2, rows, col0, n_rows, n_cols, rank, stride_dxa,
                                     threshold, acc2, R, BLOCK_M, BLOCK_K, DOT_FP32)
    out = DA + split.to(tl.int64) * stride_split + ranks[:, None] * stride_da + cols[None, :]
    inside = (ranks < rank)[:, None] & (cols < n_cols)[None, :]
    tl.store(out, acc0, mask=inside)
    if NPROJ > 1:
        tl.store(out + stride_dap, acc1, mask=inside)
    if NPROJ > 2:
        tl.store(out + 2 * stride_dap, acc2, mask=inside)


@triton.jit(do_not_specialize=["n_rows"])
def _dropped_input_grad_kernel(DXA, A, DX, SEEDS, n_rows, n_cols, rank, stride_dxap, stride_dxa, stride_ap,
                               stride_a, stride_dx, threshold, NPROJ: tl.constexpr, R: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``DX[m, k] += sum_j keep_j(m, k) * sum_r dxa[j, m, r] * A[j, r, k]``, in place, summed in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    seed0, seed1, seed2 = _seeds(SEEDS, NPROJ)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dx = DX + rows[:, None].to(tl.int64) * stride_dx + cols[None, :]
    total = tl.load(dx, mask=inside, other=0.0).to(tl.float32)
    total = _input_grad_part(DXA, A, seed0, rows, col0, n_rows, n_cols, rank, stride_dxa, stride_a, threshold, total,
                             R, BLOCK_M, BLOCK_K, DOT_FP32)
    if NPROJ > 1:
        total = _input_grad_part(DXA + stride_dxap, A + stride_ap, seed1, rows, col0, n_rows, n_cols, rank, stride_dxa,
                                 stride_a, threshold, total, R, BLOCK_M, BLOCK_K, DOT_FP32)
    if NPROJ > 2:
        total = _input_grad_part(DXA + 2 * stride_dxap, A + 2 * stride_ap, seed2, rows, col0, n_rows, n_cols, rank,
                                 stride_dxa, stride_a, threshold, total, R, BLOCK_M, BLOCK_K, DOT_FP32)
    tl.store(dx, total.to(DX.dtype.element_ty), mask=inside)


def applies(x2: torch.Tensor, rank: int) -> bool:
    """Whether the kernels can run here: a device they launch on, indices within int32, a rank tl.dot takes."""
    return (0 < x2.numel() <= MAX_ELEMENTS and rank <= 128 and x2.stride(-1) == 1
            and can_launch(_dropped_down_kernel, x2))


def keep_threshold(p: float) -> int:
    """The 16-bit word at or above which an element is kept: keep probability ``1 - p`` to within 2^-17."""
    return min(65536, max(0, round(p * 65536)))


def draw_seed(device: torch.device) -> torch.Tensor:
    """One projection's seed, from torch's generator on ``device`` (replayed by checkpoint recompute)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


# (BLOCK_M, BLOCK_K, num_warps) of each kernel on a GPU (benchmarks/gpu/lora_dropout_kernels.py sweeps them);
# BLOCK_K must be a multiple of 8 (one Philox draw covers eight columns);
# the fastest of benchmarks/gpu/lora_dropout_kernels.py's sweep on an H200 at [16384, 4096], r=16 (s20c1; the multi
# kernels at three projections): ms before -> after, down 0.064 -> 0.058, weight_grad 0.076 -> 0.066, down_multi
# 0.158 -> 0.152, weight_grad_multi 0.222 -> 0.163, input_grad_multi 0.270 -> 0.219
GPU_TILES = {"down": (32, 128, 4), "weight_grad": (64, 64, 4), "input_grad": (32, 128, 4),
             "down_multi": (64, 128, 4), "weight_grad_multi": (32, 64, 4), "input_grad_multi": (32, 128, 4)}
INTERPRETER_TILES = (32, 64, 4)  # few programs: each costs milliseconds of Python


def _tiles(kernel: str, t: torch.Tensor) -> tuple[int, int, int]:
    return GPU_TILES[kernel] if t.is_cuda else INTERPRETER_TILES


# Triton picks the interpreter when a kernel is decorated, so this is known at import
_INTERPRETING = is_interpreted(_dropped_down_kernel)


def _dot_fp32(t: torch.Tensor) -> bool:
    return exact_fp32_dot(t.dtype, _INTERPRETING)


def keep_mask(seed: torch.Tensor, shape: tuple[int, int], p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The 0/1 mask the kernels draw for ``seed`` over an ``[M, K]`` input (tests and references)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    block_m, block_k, _ = _tiles("input_grad", out)
    grid = (triton.cdiv(shape[0], block_m), triton.cdiv(shape[1], block_k))
    _keep_mask_kernel[grid](out, seed, shape[0], shape[1], keep_threshold(p), BLOCK_M=block_m, BLOCK_K=block_k)
    return out


def _projections(n_proj: int) -> int:
    if not 1 <= n_proj <= MAX_PROJECTIONS:
        raise ValueError(f"the multi-projection kernels take 1 to {MAX_PROJECTIONS} projections, not {n_proj}")
    return n_proj


def _down(x2: torch.Tensor, a: torch.Tensor, seeds: torch.Tensor, p: float, tiles: str) -> torch.Tensor:
    """``[M, K] x [P, r, K] -> [P, M, r]``: one launch for the ``P`` projections."""
    rows, cols = x2.shape
    n_proj, rank = _projections(a.shape[0]), a.shape[1]
    out = x2.new_empty(n_proj, rows, rank)
    block_m, block_k, warps = _tiles(tiles, x2)
    _dropped_down_kernel[(triton.cdiv(rows, block_m),)](
        x2, a, out, seeds, rows, cols, rank, x2.stride(0), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        keep_threshold(p), NPROJ=n_proj, R=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k,
        DOT_FP32=_dot_fp32(x2), num_warps=warps)
    return out


@torch.library.custom_op("fmsaccel_foak::dropped_down", mutates_args=())
def dropped_down(x2: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``(x2 * keep) @ a^T``: ``[M, K] x [r, K] -> [M, r]`` in ``x2``'s dtype."""
    return _down(x2, a.unsqueeze(0), seed, p, "down")[0]


@dropped_down.register_fake
def _(x2, a, seed, p):
    return x2.new_empty(x2.shape[0], a.shape[0])


@torch.library.custom_op("fmsaccel_foak::dropped_down_multi", mutates_args=())
def dropped_down_multi(x2: torch.Tensor, a: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """``(x2 * keep_j) @ a[j]^T`` for each projection ``j`` (``seeds[j]``'s mask), reading ``x2`` once:
    ``[M, K] x [P, r, K] -> [P, M, r]`` in ``x2``'s dtype."""
    return _down(x2, a, seeds, p, "down_multi")


@dropped_down_multi.register_fake
def _(x2, a, seeds, p):
    return x2.new_empty(a.shape[0], x2.shape[0], a.shape[1])


def row_splits(rows: int, column_blocks: int) -> int:
    """How many row ranges the weight gradient is summed over in parallel: enough programs to fill a GPU
    (``TARGET_PROGRAMS``), each range at least ``SPLIT_MIN_ROWS`` rows. One column block per program alone
    leaves a 4096-wide input with 128 programs walking every row (16k at workload P)."""
    return max(1, min(triton.cdiv(rows, SPLIT_MIN_ROWS), triton.cdiv(TARGET_PROGRAMS, column_blocks)))


def _weight_grad(dxa: torch.Tensor, x2: torch.Tensor, seeds: torch.Tensor, p: float, tiles: str) -> torch.Tensor:
    """``[P, M, r], [M, K] -> [P, r, K]`` in fp32: one program per column block and row range, the row ranges
    summed in a fixed order."""
    rows, cols = x2.shape
    n_proj, rank = _projections(dxa.shape[0]), dxa.shape[2]
    block_m, block_k, warps = _tiles(tiles, x2)
    column_blocks = triton.cdiv(cols, block_k)
    splits = row_splits(rows, column_blocks)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    partial = torch.empty(splits, n_proj, rank, cols, dtype=torch.float32, device=x2.device)
    _dropped_weight_grad_kernel[(column_blocks, splits)](
        dxa, x2, partial, seeds, rows, cols, rank, rows_per_split, dxa.stride(0), dxa.stride(1), x2.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), keep_threshold(p), NPROJ=n_proj, R=_rank_block(rank),
        BLOCK_M=block_m, BLOCK_K=block_k, DOT_FP32=_dot_fp32(x2), num_warps=warps)
    return partial[0] if splits == 1 else partial.sum(0)


@torch.library.custom_op("fmsaccel_foak::dropped_weight_grad", mutates_args=())
def dropped_weight_grad(dxa: torch.Tensor, x2: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``dxa^T @ (x2 * keep)``: ``[M, r], [M, K] -> [r, K]`` in fp32 (row ranges summed in a fixed order)."""
    return _weight_grad(dxa.unsqueeze(0), x2, seed, p, "weight_grad")[0]


@dropped_weight_grad.register_fake
def _(dxa, x2, seed, p):
    return x2.new_empty(dxa.shape[1], x2.shape[1], dtype=torch.float32)


@torch.library.custom_op("fmsaccel_foak::dropped_weight_grad_multi", mutates_args=())
def dropped_weight_grad_multi(dxa: torch.Tensor, x2: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """``dxa[j]^T @ (x2 * keep_j)`` for each projection ``j``, reading ``x2`` once: ``[P, M, r], [M, K] -> [P, r, K]``
    in fp32 (row ranges summed in a fixed order, as :func:`dropped_weight_grad`)."""
    return _weight_grad(dxa, x2, seeds, p, "weight_grad_multi")


@dropped_weight_grad_multi.register_fake
def _(dxa, x2, seeds, p):
    return x2.new_empty(dxa.shape[0], dxa.shape[2], x2.shape[1], dtype=torch.float32)


def _add_input_grad(dx: torch.Tensor, dxa: torch.Tensor, a: torch.Tensor, seeds: torch.Tensor, p: float,
                    tiles: str) -> None:
    """``[M, K] += [P, M, r] x [P, r, K]`` in place, the sum in fp32, rounded once."""
    rows, cols = dx.shape
    n_proj, rank = _projections(a.shape[0]), a.shape[1]
    block_m, block_k, warps = _tiles(tiles, dx)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
    _dropped_input_grad_kernel[grid](
        dxa, a, dx, seeds, rows, cols, rank, dxa.stride(0), dxa.stride(1), a.stride(0), a.stride(1), dx.stride(0),
        keep_threshold(p), NPROJ=n_proj, R=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k,
        DOT_FP32=_dot_fp32(dx), num_warps=warps)


@torch.library.custom_op("fmsaccel_foak::add_dropped_input_grad", mutates_args=("dx",))
def add_dropped_input_grad(dx: torch.Tensor, dxa: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """``dx += (dxa @ a) * keep`` in place: ``[M, K] += [M, r] x [r, K]``."""
    _add_input_grad(dx, dxa.unsqueeze(0), a.unsqueeze(0), seed, p, "input_grad")


@add_dropped_input_grad.register_fake
def _(dx, dxa, a, seed, p):
    return None


@torch.library.custom_op("fmsaccel_foak::add_dropped_input_grad_multi", mutates_args=("dx",))
def add_dropped_input_grad_multi(dx: torch.Tensor, dxa: torch.Tensor, a: torch.Tensor, seeds: torch.Tensor,
                                 p: float) -> None:
    """``dx += sum_j (dxa[j] @ a[j]) * keep_j`` in place, reading and writing ``dx`` once (the sum in fp32, rounded
    once): ``[M, K] += [P, M, r] x [P, r, K]``."""
    _add_input_grad(dx, dxa, a, seeds, p, "input_grad_multi")


@add_dropped_input_grad_multi.register_fake
def _(dx, dxa, a, seeds, p):
    return None
