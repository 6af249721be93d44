"""Cross-entropy over materialised logits, and the two row kernels the fused linear+CE reuses.

``_ce_stats_kernel`` folds each row of (scaled) logits into online log-sum-exp
statistics in fp32 (plus, on request, the entropy); ``_ce_grad_kernel`` turns logits
into ``row_scale * scale * (softmax - onehot(target))``, in place when asked to. The
logits stay in their own dtype (bf16 on the GPU): no fp32 copy of ``[tokens, vocab]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..runtime import can_launch, num_warps, row_block


@triton.jit(do_not_specialize=["n_rows"])
def _ce_stats_kernel(
    LOGITS, TARGET, LSE, Z_TARGET, MAX, ENTROPY, n_rows, n_cols, stride, scale, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    zs = tl.zeros((BLOCK_M,), tl.float32)  # sum of exp(z - m) * z, for the entropy
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < n_cols
        z = tl.load(LOGITS + rows[:, None] * stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32) * scale
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=1))
        rescale = tl.exp(m - new_m)
        e = tl.exp(z - new_m[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        if HAS_ENTROPY:
            zs = zs * rescale + tl.sum(e * tl.where(col_mask[None, :], z, 0.0), axis=1)
        m = new_m
    lse = m + tl.log(s)
    target = tl.load(TARGET + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (target != ignore_index)
    z_target = tl.load(LOGITS + rows * stride + tl.where(valid, target, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(Z_TARGET + rows, z_target * scale, mask=row_mask)
    tl.store(MAX + rows, m, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(ENTROPY + rows, lse - zs / s, mask=row_mask)


@triton.jit(do_not_specialize=["n_rows"])
def _ce_grad_kernel(
    LOGITS, GRAD, TARGET, LSE, ROW_SCALE, n_rows, n_cols, stride_l, stride_g, stride_scale, scale, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    target = tl.load(TARGET + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    row_scale = tl.load(ROW_SCALE + rows * stride_scale, mask=row_mask, other=0.0).to(tl.float32)
    row_scale = tl.where(target != ignore_index, row_scale * scale, 0.0)
    z = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale
    p = tl.exp(z - lse[:, None])
    grad = (p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * row_scale[:, None]
    tl.store(GRAD + rows[:, None] * stride_g + cols[None, :], grad.to(GRAD.dtype.element_ty), mask=mask)


def _stats_block(n_rows: int, n_cols: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(n_cols), 4096)
    return row_block(block_v, n_rows, elements=8192), block_v


def logit_stats(
    logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0, ignore_index: int = -100, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per row of ``scale * logits``: log-sum-exp, the target's logit, the max logit and (optionally) the entropy."""
    n_rows, n_cols = logits.shape
    # each output row starts 16-byte aligned whatever n_rows: Triton specialises pointers on their alignment, and a
    # token count that is not a multiple of 4 would otherwise compile a second variant in the middle of training
    out = torch.empty((4 if entropy else 3, triton.cdiv(n_rows, 4) * 4), dtype=torch.float32,
                      device=logits.device)[:, :n_rows]
    block_m, block_v = _stats_block(n_rows, n_cols)
    _ce_stats_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, targets, out[0], out[1], out[2], out[3] if entropy else out[0], n_rows, n_cols, logits.stride(0),
        scale, ignore_index, HAS_ENTROPY=entropy, BLOCK_M=block_m, BLOCK_V=block_v,
        num_warps=num_warps(block_m * block_v),
    )
    return out[0], out[1], out[2], (out[3] if entropy else None)


def softmax_grad(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor,
    scale: float = 1.0, ignore_index: int = -100, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``row_scale * scale * (softmax(scale * logits) - onehot)``; ``out=logits`` overwrites the logits in place.

    ``row_scale`` is one value per row, or a single value for all rows.
    """
    n_rows, n_cols = logits.shape
    out = torch.empty_like(logits) if out is None else out
    block_v = min(triton.next_power_of_2(n_cols), 1024)
    block_m = row_block(block_v, n_rows)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_v))
    _ce_grad_kernel[grid](
        logits, out, targets, lse, row_scale, n_rows, n_cols, logits.stride(0), out.stride(0),
        row_scale.stride(0) if row_scale.numel() > 1 else 0, scale, ignore_index, BLOCK_M=block_m, BLOCK_V=block_v,
        num_warps=num_warps(block_m * block_v),
    )
    return out


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                denominator: torch.Tensor | float | None):
        lse, z_target, _, _ = logit_stats(logits, targets, ignore_index=ignore_index)
        valid = targets != ignore_index
        losses = torch.where(valid, lse - z_target, 0.0)
        if reduction == "none":
            ctx.divide = None
            loss = losses
        else:
            divide = valid.sum() if reduction == "mean" and denominator is None else denominator
            ctx.divide = divide
            loss = losses.sum() if divide is None else losses.sum() / divide
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        row_scale = grad.float().reshape(-1)
        if ctx.divide is not None:
            row_scale = row_scale / ctx.divide
        dlogits = softmax_grad(logits, targets, lse, row_scale, ignore_index=ctx.ignore_index)
        return dlogits, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``[N, V]`` logits (any float dtype; statistics in fp32) against ``[N]`` targets.

    ``reduction``: ``mean`` over non-ignored targets (or divided by ``num_items_in_batch``
    when given, as Hugging Face does under gradient accumulation), ``sum`` or ``none``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if not can_launch(_ce_stats_kernel, logits):
        if reduction == "mean" and num_items_in_batch is not None:
            return reference.cross_entropy(logits, targets, ignore_index, "sum") / num_items_in_batch
        return reference.cross_entropy(logits, targets, ignore_index, reduction)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    denominator = num_items_in_batch if reduction == "mean" else None
    return _CrossEntropy.apply(logits, targets.contiguous(), ignore_index, reduction, denominator)
