"""Fused lm_head + cross-entropy, chunked over tokens: the ``[tokens, vocab]`` logits never exist at once.

Each chunk of tokens is projected to a ``[chunk, vocab]`` tile in the compute dtype,
folded into fp32 log-sum-exp statistics, and (when the lm_head is frozen, as under
LoRA) immediately turned into the gradient of the log-probabilities with respect to
the hidden states, so the backward is one scale per row and the tile is never
recomputed. A trainable lm_head instead keeps the log-sum-exp and recomputes each
tile in the backward to get both the hidden-state and the weight gradients, since a
per-token upstream gradient (any weighting of the tokens) does not factor out of the
weight gradient.

The core op returns per-token log-probabilities (what TRL's trainer consumes) plus the
entropy and top-1 flag for its metrics; the mean loss is built on top of it.
"""

from __future__ import annotations

import torch
import triton

from .. import reference
from ..runtime import can_launch, compute_dtype
from .cross_entropy import _ce_stats_kernel, logit_stats, softmax_grad

MIN_CHUNK = 1024  # 1024 x 128k vocab: a 256 MiB bf16 tile, large enough for an efficient matmul


def chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: the ``[chunk, vocab]`` tile about as large as the ``[tokens, hidden]`` input."""
    chunk = triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab, hidden)))
    return max(MIN_CHUNK, min(chunk, triton.next_power_of_2(n_rows)))


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation across chunks even for bf16 inputs."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except TypeError:  # torch without addmm(out_dtype=...)
            pass
    acc.addmm_(a.float(), b.float())


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, logit_scale: float):
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(hidden)
        n_rows, n_hidden = hidden.shape
        w = weight.to(dtype)
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        top1 = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)
        lse_all = torch.empty_like(logp)
        dh_unit = torch.empty((n_rows, n_hidden), dtype=dtype, device=hidden.device) if precompute else None
        minus_one = torch.full((1,), -1.0, device=hidden.device)
        chunk = chunk_rows(n_rows, n_hidden, weight.shape[0])
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = hidden[start:end].to(dtype)
            tile = h @ w.t()
            lse, z_target, z_max, ent = logit_stats(tile, targets[start:end], logit_scale, entropy=True)
            logp[start:end] = z_target - lse
            entropy[start:end] = ent
            top1[start:end] = z_target >= z_max
            lse_all[start:end] = lse
            if precompute:  # d logp / d logits, in place; then d logp / d hidden for this chunk
                softmax_grad(tile, targets[start:end], lse, minus_one, logit_scale, out=tile)
                torch.matmul(tile, w, out=dh_unit[start:end])
        ctx.precompute = precompute
        ctx.hidden_dtype = hidden.dtype
        ctx.logit_scale = logit_scale
        if precompute:
            ctx.save_for_backward(dh_unit)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.mark_non_differentiable(entropy, top1)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, _grad_entropy, _grad_top1):
        if grad_logp is None:
            return None, None, None, None
        if ctx.precompute:
            (dh_unit,) = ctx.saved_tensors
            return (dh_unit * grad_logp[:, None].to(dh_unit.dtype)).to(ctx.hidden_dtype), None, None, None
        hidden, weight, targets, lse_all = ctx.saved_tensors
        dtype = compute_dtype(hidden)
        w = weight.to(dtype)
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        row_scale = -grad_logp.float()
        chunk = chunk_rows(*hidden.shape, weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            tile = h @ w.t()
            softmax_grad(tile, targets[start:end], lse_all[start:end], row_scale[start:end], ctx.logit_scale,
                         out=tile)
            if need_h:
                dh[start:end] = tile @ w
            if need_w:
                _accumulate_fp32(dw, tile.t(), h)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, logit_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(logit_scale * hidden @ weight.T)[target]`` (fp32, differentiable), entropy, top-1.

    ``hidden [N, H]`` and ``targets [N]`` hold only the tokens to score (no ignore index).
    Entropy and top-1 carry no gradient (they feed metrics).
    """
    if hasattr(weight, "full_tensor"):  # FSDP2 shards lm_head as a DTensor: gather it (differentiably) to use it
        weight = weight.full_tensor()
    if not can_launch(_ce_stats_kernel, hidden):
        return reference.token_logprobs(hidden, weight, targets, logit_scale)
    return _TokenLogProbs.apply(hidden, weight, targets.contiguous(), float(logit_scale))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``logit_scale * hidden @ weight.T`` against ``labels`` (already aligned, not shifted).

    The mean runs over non-ignored labels, or divides the sum by ``num_items_in_batch``.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    valid = labels != ignore_index
    # every row scored, the ignored ones zeroed: ``hidden[valid]`` would wait for the GPU (a data-dependent shape)
    logp, _, _ = token_logprobs(hidden, weight, torch.where(valid, labels, 0), logit_scale)
    denominator = valid.sum() if num_items_in_batch is None else num_items_in_batch
    return -torch.where(valid, logp, 0.0).sum() / denominator
