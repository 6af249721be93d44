"""Rotary position embedding for q and k, driven by per-token angles or by ``position_ids``.

Nothing here assumes that positions run 0..L-1: the angle of each token comes either
from per-token ``cos``/``sin`` (what Hugging Face rotary modules compute from
``position_ids``, with any Llama-3 / linear / dynamic scaling already applied) or from
a ``[max_position, rot]`` table looked up by ``position_ids``. Padding-free batches,
whose positions restart at every packed example, therefore rotate correctly.

Only the first ``rot = cos.shape[-1]`` features rotate (partial rotary); the rest pass
through. The backward is the same rotation by the negated angle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..runtime import can_launch, notice_once, num_warps, row_block


@triton.jit(do_not_specialize=["n_tokens", "seq_len", "sc_b", "sp_b"])
def _rope_kernel(
    X, Y, COS, SIN, POS,
    n_tokens, seq_len, n_heads,
    sx_b, sx_h, sx_l, sx_d, sy_b, sy_h, sy_l, sy_d,
    sc_b, sc_l, sp_b, sp_l,
    HALF: tl.constexpr, BACKWARD: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)  # (head, feature) pairs of the first half
    heads = cols // HALF
    feats = cols % HALF
    t_mask = tokens < n_tokens
    mask = t_mask[:, None] & (cols < n_heads * HALF)[None, :]
    b = tokens // seq_len
    pos = tokens % seq_len
    if HAS_POS:
        row = tl.load(POS + b * sp_b + pos * sp_l, mask=t_mask, other=0).to(tl.int64) * sc_l
    else:
        row = b * sc_b + pos * sc_l
    angle = row[:, None] + feats[None, :]
    c1 = tl.load(COS + angle, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + angle + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + angle, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + angle + HALF, mask=mask, other=0.0).to(tl.float32)
    x_off = (b * sx_b + pos * sx_l)[:, None] + heads[None, :] * sx_h + feats[None, :] * sx_d
    y_off = (b * sy_b + pos * sy_l)[:, None] + heads[None, :] * sy_h + feats[None, :] * sy_d
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF * sy_d, y2.to(Y.dtype.element_ty), mask=mask)


def _bhld(t: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int, int, int, int]:
    """Sizes (batch, heads, seq) and strides (b, h, l, d) of q/k laid out [B,H,L,D] or [B,L,H,D]."""
    if unsqueeze_dim == 1:
        (batch, heads, seq, _), (sb, sh, sl, sd) = t.shape, t.stride()
    else:
        (batch, seq, heads, _), (sb, sl, sh, sd) = t.shape, t.stride()
    return batch, heads, seq, sb, sh, sl, sd


def _rotate(x, cos, sin, position_ids, unsqueeze_dim: int, backward: bool) -> torch.Tensor:
    rot = cos.shape[-1]
    y = torch.empty_like(x)  # same layout as x: HF's q/k are transposed views of [B, L, H, D]
    if rot < x.shape[-1]:
        y[..., rot:] = x[..., rot:]
    batch, heads, seq, *sx = _bhld(x, unsqueeze_dim)
    _, _, _, *sy = _bhld(y, unsqueeze_dim)
    if position_ids is not None:
        sc, sp = (0, cos.stride(0)), (position_ids.stride(0), position_ids.stride(1))
    else:
        sc, sp = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1)), (0, 0)
    n_tokens = batch * seq
    block_c = triton.next_power_of_2(heads * (rot // 2))
    block_t = row_block(block_c, n_tokens)
    _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        x, y, cos, sin, position_ids if position_ids is not None else cos,
        n_tokens, seq, heads, *sx, *sy, *sc, *sp,
        HALF=rot // 2, BACKWARD=backward, HAS_POS=position_ids is not None, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps(block_t * block_c),
    )
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, unsqueeze_dim: int):
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.unsqueeze_dim = unsqueeze_dim
        return (_rotate(q, cos, sin, position_ids, unsqueeze_dim, False),
                _rotate(k, cos, sin, position_ids, unsqueeze_dim, False))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        d = ctx.unsqueeze_dim
        return (_rotate(dq, cos, sin, position_ids, d, True), _rotate(dk, cos, sin, position_ids, d, True),
                None, None, None, None)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (``[B, H, L, D]`` with ``unsqueeze_dim=1``, ``[B, L, H, D]`` with 2).

    ``cos``/``sin``: per token ``[B or 1, L, rot]``, or with ``position_ids [B, L]`` a
    ``[max_position, rot]`` table. ``cos``/``sin`` get no gradient.
    """
    rot = cos.shape[-1]
    unsupported = (
        unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or rot % 2 or rot > q.shape[-1]
        or cos.dim() != (2 if position_ids is not None else 3) or cos.shape != sin.shape
        or cos.stride(-1) != 1 or sin.stride() != cos.stride() or cos.requires_grad
    )
    if unsupported:
        notice_once("rope-layout", f"rope: q {tuple(q.shape)}, cos {tuple(cos.shape)} (unsqueeze_dim "
                                   f"{unsqueeze_dim}) is not a layout the kernel takes; using the reference")
    if unsupported or not can_launch(_rope_kernel, q):
        return reference.rope(q, k, cos, sin, position_ids, unsqueeze_dim)
    return _RoPE.apply(q, k, cos, sin, position_ids, unsqueeze_dim)
