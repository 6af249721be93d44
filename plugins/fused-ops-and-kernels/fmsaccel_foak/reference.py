"""Plain-torch references for every kernel: the ground truth of the tests and the CPU fallback.

Each one computes exactly what the Hugging Face module it stands in for computes
(same dtype promotion, same rounding points), so a patched model on a machine
without Triton behaves like the unpatched one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """Llama-style: ``weight * (x / rms(x)).to(x.dtype)``; Gemma-style: ``(x / rms(x)) * (1 + weight)`` in fp32."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k; the first ``cos.shape[-1]`` features rotate, the rest pass (partial rotary).

    ``cos``/``sin`` are per token ``[batch or 1, seq, rot]`` (what HF rotary modules return)
    or, with ``position_ids`` ``[batch, seq]``, a table ``[max_position, rot]`` indexed by them.
    """
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = x_rot * cos + _rotate_half(x_rot) * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return apply(q), apply(k)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy`` on fp32 logits, as Hugging Face's causal-LM loss computes it."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, logit_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``log p(target)``, entropy and whether the target is the top-1 token, from full logits."""
    logits = (hidden @ weight.to(hidden.dtype).t()).float() * logit_scale
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    top1 = logits.gather(-1, targets[:, None]).squeeze(-1) >= logits.max(-1).values
    return logp, entropy.detach(), top1
