"""RMSNorm: one pass forward (saves 1/rms per row), one pass backward (dx and the weight's partial sums).

Llama style rounds the normalised row to the input dtype before the weight multiply
and returns the promoted dtype, exactly like ``LlamaRMSNorm``; Gemma style multiplies
by ``1 + weight`` in fp32 and returns the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..runtime import can_launch, num_warps, row_block


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GEMMA:
        y = normed * (1.0 + w)
    else:
        y = normed.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, stride_dy, stride_x, stride_dx, rows_per_program,
    GEMMA: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        normed = x * rstd
        dnormed = dy * w
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            if not GEMMA:
                normed = normed.to(X.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * normed, axis=0)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (remembered: compiled code reads it without asking CUDA)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _programs(n_rows: int, block_m: int, device: torch.device) -> int:
    """Backward programs: enough to fill the GPU, each summing its own slice of the weight gradient."""
    blocks = triton.cdiv(n_rows, block_m)
    if device.type != "cuda":
        return 1
    return min(blocks, 4 * sm_count(device))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m = row_block(n_cols, n_rows)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
            GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(n_cols),
            num_warps=num_warps(block_m * triton.next_power_of_2(n_cols)),
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        block_m = row_block(n_cols, n_rows)
        programs = _programs(n_rows, block_m, x2.device)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
        programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty((programs, n_cols) if has_dw else (1,), dtype=torch.float32, device=x2.device)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
            rows_per_program, GEMMA=ctx.gemma, HAS_DW=has_dw, BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(n_cols),
            num_warps=num_warps(block_m * triton.next_power_of_2(n_cols)),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if has_dw else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension (``gemma=True``: scale by ``1 + weight``)."""
    if not can_launch(_rms_norm_fwd_kernel, x):
        return reference.rms_norm(x, weight, eps, gemma)
    return _RMSNorm.apply(x, weight, eps, gemma)
