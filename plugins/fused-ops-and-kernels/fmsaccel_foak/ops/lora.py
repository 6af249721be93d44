"""Fused LoRA: base (dequantised) + low-rank update in one autograd function, for projections sharing an input.

``y_i = x @ W_i^T + b_i + s_i * (drop_i(x) @ A_i^T) @ B_i^T`` for every projection ``i``
that reads the same ``x`` (q/k/v, or gate/up). Compared with PEFT's module chain:

- ``x`` is saved once for all projections, dropout keeps a 0/1 mask in the compute dtype
  (drawn and applied by vectorised same-dtype kernels; the ``1/(1-p)`` rescale is folded
  into the LoRA scaling), and the rank-``r`` product ``(x * mask) @ A^T`` is the only other
  activation kept; the base output itself is never saved (``W`` is frozen);
- each quantised ``W_i`` is dequantised once in the forward; the backward re-dequantises
  it, or reuses the forward's copy when ``keep_weights`` (cheap under gradient
  checkpointing, where only one layer's recompute holds them at a time);
- the rank-``r`` update is computed first and the base matmul accumulates onto it in its
  epilogue, so adding it costs no pass of its own over the output;
- the backward accumulates ``dx`` over all projections in place.

Dropout draws each projection's mask with :func:`dropout_mask` (``bernoulli_``), in
projection order; checkpoint recompute replays them from the saved RNG state. With
``dropout_in_kernel`` the mask is drawn inside Triton kernels from a per-projection seed
instead, and never stored (:mod:`.lora_dropout`); projections of one call with the same rank
and ``p`` then share each kernel launch, each with its own seed (the backward runs those after
every base input gradient, so ``dx`` is read and written once for them all). (Drawing
masks through ``F.dropout`` on a tensor of ones, to reproduce PEFT's RNG stream, cost
four memory passes and a type-promoting multiply per projection: 13 % of a llama3-8b
QLoRA step on the H100.)

The op is matmuls and elementwise torch; the Triton work is in the dequantisation
(bitsandbytes / our GPTQ kernel), so it runs anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base_layers import dequantize_base_weight, is_quantized
from ..checkpointing import checkpointed_forward, recomputing
from ..runtime import compute_dtype
from . import fp8 as fp8_ops
from . import lora_dropout


@dataclass(frozen=True)
class Projection:
    """One output of the fused op: a frozen base layer and, optionally, its LoRA update."""

    base: nn.Module
    has_lora: bool
    scaling: float = 0.0
    dropout: float = 0.0


def lora_parts(layer: nn.Module) -> tuple[Projection, tuple[torch.Tensor, ...]]:
    """The :class:`Projection` and ``(A, B)`` weights of a PEFT LoRA layer (or of a bare base layer)."""
    base = layer.base_layer if hasattr(layer, "lora_A") else layer
    if any(p.requires_grad for p in base.parameters()):
        raise ValueError(f"fused LoRA needs a frozen base layer; {type(base).__name__} has trainable parameters")
    if not hasattr(layer, "lora_A"):
        return Projection(layer, False), ()
    (adapter,) = layer.active_adapters
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    projection = Projection(layer.base_layer, True, float(layer.scaling[adapter]), float(p))
    return projection, (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)


def dropout_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 keep-mask (probability ``1 - p``) in ``x2``'s dtype, without the ``1/(1-p)`` rescale."""
    return torch.empty_like(x2).bernoulli_(1.0 - p)


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, projections: tuple[Projection, ...], keep_weights: bool, fp8: bool,
                dropout_in_kernel: bool, down_products: str | None, *lora_weights):
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        ctx.fp8 = fp8 and fp8_ops.applies(x2)
        x_fp8 = fp8_ops.QuantizedInput(x2) if ctx.fp8 else None  # quantised once for all projections
        lora = [proj for proj in projections if proj.has_lora]
        a_s, bs = [a.to(dtype) for a in lora_weights[0::2]], [b.to(dtype) for b in lora_weights[1::2]]
        in_kernel = [bool(proj.dropout) and dropout_in_kernel and lora_dropout.applies(x2, a.shape[0])
                     for proj, a in zip(lora, a_s, strict=True)]
        masks: list[torch.Tensor | None] = [None] * len(lora)  # for in-kernel projections, the seed of the mask
        products: list[torch.Tensor | None] = [None] * len(lora)
        group = [i for i, seeded in enumerate(in_kernel) if seeded]
        # in-kernel projections sharing their launches draw their seeds here, before any base matmul: the same
        # stream as one at a time, as long as no bernoulli_ mask is drawn in between (none in the call, then)
        if _one_launch([(a_s[i].shape[0], lora[i].dropout) for i in group]) and all(
                seeded or not proj.dropout for proj, seeded in zip(lora, in_kernel, strict=True)):
            seeds, xas = _seeded_down(x2, [lora[i] for i in group], [a_s[i] for i in group], down_products)
            for i, seed, xa in zip(group, seeds, xas, strict=True):
                masks[i], products[i] = seed, xa
        outputs, kept, own_weights = [], [], []
        lora_index = iter(range(len(lora)))
        for proj in projections:
            w = dequantize_base_weight(proj.base, dtype)
            bias = None if proj.base.bias is None else proj.base.bias.to(dtype)
            fp8_here = x_fp8 is not None and w.shape[0] % 16 == 0
            update = None
            if proj.has_lora:
                i = next(lora_index)
                if in_kernel[i] and products[i] is None:  # its own seed and launch
                    (masks[i],), (products[i],) = _seeded_down(x2, [proj], [a_s[i]], down_products)
                elif not in_kernel[i]:
                    masks[i] = dropout_mask(x2, proj.dropout) if proj.dropout else None
                    products[i] = (x2 * masks[i] if masks[i] is not None else x2) @ a_s[i].t()
                update = _low_rank_update(products[i], bs[i], proj.scaling / (1.0 - proj.dropout),
                                          None if fp8_here else bias)
            if fp8_here:
                y = fp8_ops.linear(x_fp8, w, dtype)
                if bias is not None:
                    y.add_(bias)
                if update is not None:
                    y.add_(update)
            elif update is not None:  # the base product accumulates onto the update: no extra pass over y
                y = update.addmm_(x2, w.t())
            else:
                y = F.linear(x2, w, bias)
            # a weight used as it is (not dequantised or cast) is the module's own and lives on ctx: a saved tensor
            # would make the checkpoint recompute run this product again (early stop waits for every saved tensor)
            own = w is getattr(proj.base, "weight", None)
            own_weights.append(w if own else None)
            kept.append(w if not own and (keep_weights or not is_quantized(proj.base)) else None)
            del w  # else it stays alive while the next projection's weight is dequantised (117 MiB at 8B's MLP)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.projections, ctx.dtype, ctx.x_dtype = projections, dtype, x.dtype
        ctx.in_kernel, ctx.own_weights = in_kernel, own_weights
        ctx.save_for_backward(x2 if lora else None, *lora_weights, *masks, *products, *kept)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        projections, dtype = ctx.projections, ctx.dtype
        saved = list(ctx.saved_tensors)
        x2 = saved.pop(0)
        n_lora = sum(p.has_lora for p in projections)
        lora_weights, saved = saved[: 2 * n_lora], saved[2 * n_lora:]
        masks, products, kept = saved[:n_lora], saved[n_lora: 2 * n_lora], saved[2 * n_lora:]
        need_dx = ctx.needs_input_grad[0]
        lora = [(proj, grad) for proj, grad in zip(projections, grads, strict=True) if proj.has_lora]
        # in-kernel projections that share their launches: their kernels run after every base input gradient
        shared = _one_launch([(lora_weights[2 * i].shape[0], proj.dropout) for i, (proj, grad) in enumerate(lora)
                              if ctx.in_kernel[i] and grad is not None])
        dx = None
        lora_grads: list[torch.Tensor | None] = []
        deferred = []  # (slot in lora_grads, dxa, A, seed, p, A's dtype) of the projections that share launches
        i_lora = 0
        for proj, grad, saved_w, own_w in zip(projections, grads, kept, ctx.own_weights, strict=True):
            w = saved_w if saved_w is not None else own_w
            if proj.has_lora:
                a_param, b_param = lora_weights[2 * i_lora], lora_weights[2 * i_lora + 1]
                mask, xa, seeded = masks[i_lora], products[i_lora], ctx.in_kernel[i_lora]
                i_lora += 1
            if grad is None:
                if proj.has_lora:
                    lora_grads += [None, None]
                continue
            dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
            if need_dx:
                w = dequantize_base_weight(proj.base, dtype) if w is None else w
                if ctx.fp8 and w.shape[0] % 16 == 0:
                    part = fp8_ops.input_grad(dy, w, dtype)
                    dx = part if dx is None else dx.add_(part)
                else:
                    dx = dy @ w if dx is None else dx.addmm_(dy, w)
            w = None  # a dequantised copy is freed before the next one is made
            if not proj.has_lora:
                continue
            a, b = a_param.to(dtype), b_param.to(dtype)
            alpha = proj.scaling / (1.0 - proj.dropout)
            dxa = (dy @ b).mul_(alpha)  # d loss / d ((x * mask) @ A^T)
            db = (dy.t() @ xa).mul_(alpha)
            if seeded and shared:
                deferred.append((len(lora_grads), dxa, a, mask, proj.dropout, a_param.dtype))
                lora_grads += [None, db.to(b_param.dtype)]
                continue
            if seeded:
                da = lora_dropout.dropped_weight_grad(dxa, x2, mask, proj.dropout)
                if need_dx:
                    dx = torch.zeros_like(x2) if dx is None else dx
                    lora_dropout.add_dropped_input_grad(dx, dxa, a, mask, proj.dropout)
                lora_grads += [da.to(a_param.dtype), db.to(b_param.dtype)]
                continue
            da = dxa.t() @ (x2 if mask is None else x2 * mask)
            if need_dx and mask is None:
                dx = dxa @ a if dx is None else dx.addmm_(dxa, a)
            elif need_dx:
                dxd = (dxa @ a).mul_(mask)
                dx = dxd if dx is None else dx.add_(dxd)
            lora_grads += [da.to(a_param.dtype), db.to(b_param.dtype)]
        if deferred:  # one weight-gradient and one input-gradient launch for them all, each reading x or dx once
            slots, dxas, a_s, seeds, ps, a_dtypes = zip(*deferred, strict=True)
            dxa, seeds = torch.stack(dxas), torch.cat(seeds)
            das = lora_dropout.dropped_weight_grad_multi(dxa, x2, seeds, ps[0])
            if need_dx:  # dx holds the base input gradients (each deferred projection had one)
                lora_dropout.add_dropped_input_grad_multi(dx, dxa, torch.stack(a_s), seeds, ps[0])
            for slot, da, a_dtype in zip(slots, das, a_dtypes, strict=True):
                lora_grads[slot] = da.to(a_dtype)
        if dx is not None:
            dx = dx.view(*_input_shape(grads, dx.shape[-1])).to(ctx.x_dtype)
        return (dx, None, None, None, None, None, *lora_grads)


def _one_launch(shapes: list[tuple[int, float]]) -> bool:
    """Whether in-kernel projections of these ``(rank, p)`` share each kernel launch (the ``*_multi`` kernels)."""
    return 2 <= len(shapes) <= lora_dropout.MAX_PROJECTIONS and len(set(shapes)) == 1


def _seeded_down(x2: torch.Tensor, lora: list[Projection], a_s: list[torch.Tensor],
                 down_products: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """In-kernel projections' seeds (drawn in order) and ``(x2 * keep) @ A^T`` products, taken from the forward in a
    recompute and kept for it in a checkpointed forward (see :func:`_down_products`)."""
    seeds = [lora_dropout.draw_seed(x2.device) for _ in lora]  # drawn in the recompute too: the same stream after it
    products = [proj.base.__dict__.pop("_foak_down_product", None) if down_products == "take" else None
                for proj in lora]
    todo = [i for i, xa in enumerate(products) if xa is None]
    for i, xa in zip(todo, _dropped_down(x2, [(a_s[i], seeds[i], lora[i].dropout) for i in todo]), strict=True):
        products[i] = xa
    if down_products == "keep":
        for proj, xa in zip(lora, products, strict=True):
            proj.base.__dict__["_foak_down_product"] = xa
    return seeds, products


def _dropped_down(x2: torch.Tensor, jobs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[torch.Tensor]:
    """``(x2 * keep) @ A^T`` for each ``(A, seed, p)`` of ``jobs``, in one launch where they can share one."""
    if not _one_launch([(a.shape[0], p) for a, _, p in jobs]):
        return [lora_dropout.dropped_down(x2, a, seed, p) for a, seed, p in jobs]
    a_s, seeds, ps = zip(*jobs, strict=True)
    return list(lora_dropout.dropped_down_multi(x2, torch.stack(a_s), torch.cat(seeds), ps[0]).unbind(0))


def _low_rank_update(xa: torch.Tensor, b: torch.Tensor, alpha: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``alpha * xa @ b^T (+ bias)``, a fresh ``[tokens, out]`` tensor for the base matmul to accumulate onto.

    The base product then adds itself in its own epilogue (``beta = 1``), instead of a
    second kernel reading and writing the full output again to add the rank-``r`` term.
    """
    if bias is None:
        out = torch.empty((xa.shape[0], b.shape[0]), dtype=xa.dtype, device=xa.device)
        return torch.addmm(out, xa, b.t(), beta=0, alpha=alpha, out=out)
    return torch.addmm(bias, xa, b.t(), alpha=alpha)


def _input_shape(grads, features: int) -> tuple[int, ...]:
    """The input's shape, recovered from any of the output gradients."""
    grad = next(g for g in grads if g is not None)
    return (*grad.shape[:-1], features)


def fused_lora(
    x: torch.Tensor, layers: Sequence[nn.Module], keep_weights: bool = False, fp8: bool = False,
    dropout_in_kernel: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run ``layers`` (PEFT LoRA layers or bare base layers) that all read ``x``, as one fused op.

    Returns one output per layer. ``keep_weights`` keeps dequantised weights from the
    forward for the backward instead of dequantising again. ``fp8`` runs the frozen base
    matmuls (forward and input gradient) in FP8 where :func:`.fp8.applies` (see :mod:`.fp8`).
    ``dropout_in_kernel`` draws LoRA dropout inside Triton kernels, storing no mask, where
    :func:`.lora_dropout.applies` (see :mod:`.lora_dropout`).
    """
    projections, weights = zip(*(lora_parts(layer) for layer in layers), strict=True)
    flat = [t for pair in weights for t in pair]
    return _FusedLoRA.apply(x, tuple(projections), keep_weights, fp8, dropout_in_kernel,
                            _down_products(dropout_in_kernel), *flat)


def _down_products(dropout_in_kernel: bool) -> str | None:
    """``"keep"`` in a checkpointed layer's forward, ``"take"`` in its recompute, else None (``dropout_in_kernel``).

    The forward keeps each projection's ``(x * keep) @ A^T`` (``[tokens, r]``, 0.5 MiB at 16k tokens and r=16)
    on its base module for the recompute, which replays the same seed on the same ``x`` and so would compute the
    same product: that launch (~0.07 ms on an H200 at llama3-8b, four projections a layer) runs once a step.
    Eager only: compiled layers are left as they are.
    """
    if not dropout_in_kernel or torch.compiler.is_compiling():
        return None
    if recomputing():
        return "take"
    return "keep" if torch.is_grad_enabled() and checkpointed_forward() else None
