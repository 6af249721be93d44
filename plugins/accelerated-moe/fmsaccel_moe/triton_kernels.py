"""Triton kernels for routed experts: grouped GEMMs that gather and scatter rows.

Three kernels, all reading a :class:`~fmsaccel_moe.routing.Routing`:

- ``expert_mm``: ``out[r] = f(a[row(r)]) @ W[e(r)]`` for every sorted row ``r``; the
  input row is gathered from the unsorted tokens in-kernel, the output row may be
  scattered back to slot order, ``f`` may be the SwiGLU of a ``[gate | up]`` row (so
  the intermediate activation is never written), and rows may be scaled by their
  routing weight.
- ``expert_xty``: per-expert weight gradient ``sum_r a[row(r)]^T f(b[row(r)])`` with
  the same gather / SwiGLU / scaling options.
- ``swiglu_backward``: SwiGLU backward fused with the routing-weight gradient.

Tiles never straddle experts (see ``Routing.blocks``). Triton under
``TRITON_INTERPRET=1`` runs them on the CPU for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fmsaccel_framework.triton_utils import exact_fp32_dot, grouped_tile_order, is_interpreted

from .routing import Routing


def interpreting() -> bool:
    return is_interpreted(_expert_mm_kernel)  # decorated with the module, so it knows how Triton runs them


TALL_TILES_FROM_ROWS_PER_EXPERT = 512


def row_block(rows: int, num_experts: int) -> int:
    """Row-tile height: tall tiles when experts get many rows, short ones for small groups."""
    return 128 if rows / max(num_experts, 1) >= TALL_TILES_FROM_ROWS_PER_EXPERT else 64


def _row_block(routing: Routing) -> int:
    return 16 if interpreting() else row_block(routing.num_rows, routing.num_experts)


def warm_up_token_counts(num_experts: int, top_k: int) -> list[int]:
    """Token counts that between them meet every compiled variant a run can: both row-tile heights (a
    constexpr and an autotuning key) and both parities (Triton specialises integers divisible by 16).
    Run before training, so no step in the middle of a run stops to compile and autotune (s11c4, s11c6:
    10 s at the first batch of long rows)."""
    switch = -(-TALL_TILES_FROM_ROWS_PER_EXPERT * num_experts // top_k)  # first count with tall tiles
    tall = -(-switch // 16) * 16
    short = max(16, (switch // 2) // 16 * 16)
    return [short, short + 1, tall, tall + 1]


# ----------------------------------------------------------------------------- expert_mm


@triton.jit(do_not_specialize=["num_m_tiles"])
def _expert_mm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    token_ptr,
    slot_ptr,
    scale_ptr,
    block_expert_ptr,
    block_start_ptr,
    ends_ptr,
    num_m_tiles,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    SWIGLU: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_order(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    start = tl.load(block_start_ptr + pid_m)
    end = tl.load(ends_ptr + expert).to(tl.int32)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if GATHER:
        in_rows = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        in_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    a_base = a_ptr + in_rows[:, None] * stride_am
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(a_base + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        if SWIGLU:
            # a holds [gate | up]: the down projection's input silu(gate) * up is built in registers.
            up = tl.load(a_base + (ks[None, :] + K) * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            gate = a.to(tl.float32)
            a = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
        w = tl.load(w_base + ks[:, None].to(tl.int64) * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)

    if SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    if SCATTER:
        out_rows = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        out_rows = rows.to(tl.int64)
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _mm_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (128, 64, 4, 4),
            (128, 64, 8, 3),
            (64, 64, 4, 4),
            (256, 64, 8, 3),
        ]
    ]


_expert_mm_tuned = triton.autotune(
    configs=_mm_configs(), key=["N", "K", "BLOCK_M", "GATHER", "SCATTER", "SWIGLU", "SCALE"]
)(_expert_mm_kernel)


def expert_mm(
    a: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    gather: bool = False,
    scatter: bool = False,
    transpose_weight: bool = False,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[S, N]`` rows ``f(a[row(r)]) @ W_e^T`` (``W_e`` itself with ``transpose_weight``).

    weight: ``[E, N, K]`` (Hugging Face ``out x in`` layout) or ``[E, K, N]`` with
    ``transpose_weight``. With ``swiglu`` the input rows are ``[gate | up]`` of width
    ``2K``. Output rows go to slot order with ``scatter``, else stay sorted.
    """
    if a.dtype != weight.dtype:
        raise TypeError(f"expert_mm: input {a.dtype} and weight {weight.dtype} differ")
    if transpose_weight:
        _, k, n = weight.shape
        stride_we, stride_wk, stride_wn = weight.stride()
    else:
        _, n, k = weight.shape
        stride_we, stride_wn, stride_wk = weight.stride()
    if a.size(1) != (2 * k if swiglu else k):
        raise ValueError(f"expert_mm: input width {a.size(1)} does not match weight {tuple(weight.shape)}")
    out = a.new_empty(routing.num_rows, n)
    if routing.num_rows == 0:
        return out
    block_m = _row_block(routing)
    block_expert, block_start = routing.blocks(block_m)
    args = (
        a,
        weight,
        out,
        routing.token,
        routing.slot,
        row_scale if row_scale is not None else out,
        block_expert,
        block_start,
        routing.ends,
        block_expert.numel(),
        n,
        k,
        a.stride(0),
        a.stride(1),
        stride_we,
        stride_wk,
        stride_wn,
        out.stride(0),
        out.stride(1),
    )
    flags = dict(GATHER=gather, SCATTER=scatter, SWIGLU=swiglu, SCALE=row_scale is not None)
    flags["DOT_FP32"] = exact_fp32_dot(a.dtype, interpreting())
    tiles_m = block_expert.numel()
    if interpreting():
        grid = (tiles_m * triton.cdiv(n, 64),)
        _expert_mm_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)
    else:

        def grid(meta):
            return (tiles_m * triton.cdiv(n, meta["BLOCK_N"]),)

        _expert_mm_tuned[grid](*args, **flags, BLOCK_M=block_m, GROUP_M=8)
    return out


# ----------------------------------------------------------------------------- expert_xty


@triton.jit
def _expert_xty_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    token_ptr,
    scale_ptr,
    ends_ptr,
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SWIGLU_B: tl.constexpr,
    SCALE_A: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # expert-major order: the tiles running together share one expert's rows (in L2)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (tiles_m * tiles_n)
    pid_m, pid_n = grouped_tile_order(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    end = tl.load(ends_ptr + expert).to(tl.int32)
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < end
        if GATHER_A:
            a_rows = tl.load(token_ptr + rs, mask=r_mask, other=0).to(tl.int64)
        else:
            a_rows = rs.to(tl.int64)
        if GATHER_B:
            b_rows = tl.load(token_ptr + rs, mask=r_mask, other=0).to(tl.int64)
        else:
            b_rows = rs.to(tl.int64)
        # a^T tile: [BLOCK_M, BLOCK_R]
        a = tl.load(
            a_ptr + a_rows[None, :] * stride_ar + ms[:, None] * stride_am,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if SCALE_A:
            scale = tl.load(scale_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(b_ptr.dtype.element_ty)
        b_mask = r_mask[:, None] & n_mask[None, :]
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + ns[None, :] * stride_bn, mask=b_mask, other=0.0)
        if SWIGLU_B:
            up = tl.load(b_ptr + b_rows[:, None] * stride_br + (ns[None, :] + N) * stride_bn, mask=b_mask, other=0.0)
            gate = b.to(tl.float32)
            b = (gate * tl.sigmoid(gate) * up.to(tl.float32)).to(b_ptr.dtype.element_ty)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _xty_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bm, bn, br, w, s in [
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (64, 128, 64, 4, 3),
        ]
    ]


_expert_xty_tuned = triton.autotune(configs=_xty_configs(), key=["M", "N", "GATHER_A", "GATHER_B", "SWIGLU_B"])(
    _expert_xty_kernel
)


def expert_xty(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    *,
    gather_a: bool = False,
    gather_b: bool = False,
    swiglu_b: bool = False,
    a_row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert ``sum_r (s_r a[row(r)])^T f(b[row(r)])`` -> ``[E, M, N]`` (a weight gradient)."""
    if a.dtype != b.dtype:
        raise TypeError(f"expert_xty: {a.dtype} and {b.dtype} differ")
    m = a.size(1)
    n = b.size(1) // 2 if swiglu_b else b.size(1)
    out = a.new_empty(routing.num_experts, m, n)
    args = (
        a,
        b,
        out,
        routing.token,
        a_row_scale if a_row_scale is not None else out,
        routing.ends,
        m,
        n,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    flags = dict(GATHER_A=gather_a, GATHER_B=gather_b, SWIGLU_B=swiglu_b, SCALE_A=a_row_scale is not None)
    flags["DOT_FP32"] = exact_fp32_dot(a.dtype, interpreting())
    experts = routing.num_experts
    if interpreting():
        grid = (experts * triton.cdiv(m, 64) * triton.cdiv(n, 64),)
        _expert_xty_kernel[grid](*args, **flags, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, GROUP_M=2)
    else:

        def grid(meta):
            return (experts * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _expert_xty_tuned[grid](*args, **flags, GROUP_M=8)
    return out


# ----------------------------------------------------------------------------- SwiGLU (row-wise)


def _row_tiles(rows: int, inter: int) -> tuple[int, int, tuple[int]]:
    block = min(256 if interpreting() else 1024, triton.next_power_of_2(inter))
    block_r = max(1, 4096 // block)
    return block_r, block, (triton.cdiv(rows, block_r),)


@triton.jit(do_not_specialize=["rows"])
def _swiglu_kernel(gate_up_ptr, h_ptr, rows, inter, stride_gu, stride_h, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rs = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_mask = rs < rows
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = r_mask[:, None] & (cols < inter)[None, :]
        gu = gate_up_ptr + rs[:, None] * stride_gu + cols[None, :]
        gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu + inter, mask=mask, other=0.0).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + rs[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[gate | up]`` rows (fp32 math)."""
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.size(0), gate_up.size(1) // 2
    h = gate_up.new_empty(rows, inter)
    if rows:
        block_r, block, grid = _row_tiles(rows, inter)
        _swiglu_kernel[grid](gate_up, h, rows, inter, gate_up.stride(0), h.stride(0), BLOCK_R=block_r, BLOCK=block)
    return h


@triton.jit(do_not_specialize=["rows"])
def _swiglu_backward_kernel(
    gate_up_ptr,
    grad_ptr,
    scale_ptr,
    d_gate_up_ptr,
    d_scale_ptr,
    h_ptr,
    rows,
    inter,
    stride_gu,
    stride_g,
    stride_dgu,
    stride_h,
    SCALE: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rs < rows
    rs64 = rs.to(tl.int64)
    if SCALE:
        scale = tl.load(scale_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    else:
        scale = 1.0
    dot = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = r_mask[:, None] & (cols < inter)[None, :]
        gu = gate_up_ptr + rs64[:, None] * stride_gu + cols[None, :]
        gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu + inter, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + rs64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dot += g * silu * up
        dh = g * scale
        d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
        dgu = d_gate_up_ptr + rs64[:, None] * stride_dgu + cols[None, :]
        tl.store(dgu, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu + inter, (dh * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            h = scale * silu * up
            tl.store(h_ptr + rs64[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if SCALE:
        tl.store(d_scale_ptr + rs, tl.sum(dot, axis=1), mask=r_mask)


def swiglu_backward(
    gate_up: torch.Tensor, grad: torch.Tensor, row_scale: torch.Tensor | None, *, want_h: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``s_r * silu(gate) * up`` given ``grad`` of the unscaled product.

    Returns ``d_gate_up``, ``d_scale[r] = <grad_r, silu(gate_r) * up_r>`` (fp32, with
    ``row_scale``) and, with ``want_h``, the recomputed ``s_r * silu(gate) * up`` (for the
    down projection's weight gradient). ``out`` receives ``d_gate_up`` and may be ``gate_up``
    itself: each program reads its rows' gate and up before it stores their gradients.
    """
    gate_up, grad = gate_up.contiguous(), grad.contiguous()
    rows, inter = gate_up.size(0), gate_up.size(1) // 2
    d_gate_up = out if out is not None else torch.empty_like(gate_up)
    d_scale = torch.empty(rows, device=gate_up.device, dtype=torch.float32) if row_scale is not None else None
    h = gate_up.new_empty(rows, inter) if want_h else None
    if rows == 0:
        return d_gate_up, d_scale, h
    block_r, block, grid = _row_tiles(rows, inter)
    _swiglu_backward_kernel[grid](
        gate_up,
        grad,
        row_scale if row_scale is not None else gate_up,
        d_gate_up,
        d_scale if d_scale is not None else gate_up,
        h if h is not None else gate_up,
        rows,
        inter,
        gate_up.stride(0),
        grad.stride(0),
        d_gate_up.stride(0),
        h.stride(0) if h is not None else 0,
        SCALE=row_scale is not None,
        STORE_H=want_h,
        BLOCK_R=block_r,
        BLOCK=block,
        num_warps=8,
    )
    return d_gate_up, d_scale, h
