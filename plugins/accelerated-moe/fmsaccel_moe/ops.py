"""Routed SwiGLU experts as two autograd functions over the expert primitives.

``routed_experts`` is what a patched experts module runs:

    gate_up[r] = x[token(r)] @ W_gate_up[e(r)]^T             (ExpertLinear, input gathered)
    out[t]     = sum_k w[t,k] * (silu(gate) * up)[r] @ W_down[e]^T   (SwigluDownCombine)

What autograd keeps per layer is ``x`` (already kept by the layer before) and
``gate_up``; the gathered token copies, the SwiGLU output and the per-slot down
projection rows are never stored (the routing-weight gradient is recovered as
``<d_out @ W_down, silu(gate) * up>``). Hugging Face's ``grouped_mm`` path keeps all of
them.

SwiGLU fusion: the down projection can build ``silu(gate) * up`` while loading its
input tiles (nothing written), but then recomputes it once per output column tile,
``hidden / 128`` times. That pays for narrow models; for wide ones a separate pass
that writes ``h`` (freed after the GEMM) is cheaper, and the backward gets ``h`` from
its SwiGLU-gradient pass. ``FUSE_SWIGLU_MAX_HIDDEN`` is the crossover.

A backend is a module with ``expert_mm``, ``expert_xty``, ``swiglu`` and
``swiglu_backward``: ``triton_kernels`` ("triton") or ``torch_kernels`` ("grouped_mm").
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from . import torch_kernels
from .routing import Routing, route

BACKENDS = ("triton", "grouped_mm")
FUSE_SWIGLU_MAX_HIDDEN = 1024


def backend_module(name: str) -> ModuleType:
    if name == "grouped_mm":
        return torch_kernels
    if name == "triton":
        from . import triton_kernels

        return triton_kernels
    raise ValueError(f"unknown MoE backend {name!r}; expected one of {BACKENDS}")


def fuse_swiglu_for(down_proj, requested: bool | None) -> bool:
    """Whether the down projection builds SwiGLU in its input loads (``None``: ``FUSE_SWIGLU_MAX_HIDDEN`` decides)."""
    return down_proj.size(1) <= FUSE_SWIGLU_MAX_HIDDEN if requested is None else requested


def _save_weight(ctx, weight) -> torch.Tensor | None:
    """A 4-bit expert weight (``quantized.QuantizedExpertWeight``) is kept as is and dequantised
    again in backward; returns the tensor to save (None for those)."""
    ctx.quantized = None if isinstance(weight, torch.Tensor) else weight
    return weight if ctx.quantized is None else None


def _weight(ctx, saved: torch.Tensor | None) -> torch.Tensor:
    return saved if ctx.quantized is None else ctx.quantized.dequantize()


def _dense(weight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


class ExpertLinear(torch.autograd.Function):
    """``y[r] = x[row(r)] @ W[e(r)]^T`` in sorted-row order (rows gathered from tokens with ``gather``)."""

    @staticmethod
    def forward(ctx, x, weight, routing: Routing, gather: bool, backend: ModuleType):
        ctx.save_for_backward(x, _save_weight(ctx, weight))
        ctx.routing, ctx.gather, ctx.backend = routing, gather, backend
        return backend.expert_mm(x, _dense(weight), routing, gather=gather)

    @staticmethod
    def backward(ctx, d_y):
        x, weight = ctx.saved_tensors
        d_x, d_w = linear_backward(d_y, x, _weight(ctx, weight), ctx.routing, ctx.gather, ctx.backend,
                                   *ctx.needs_input_grad[:2])
        return d_x, d_w, None, None, None


def linear_backward(d_y, x, weight, routing: Routing, gather: bool, backend: ModuleType, want_x: bool, want_w: bool):
    """Gradients of ``ExpertLinear`` for its input and weight (None where not wanted)."""
    d_y = d_y.contiguous()
    d_x = d_w = None
    if want_x:
        d_rows = backend.expert_mm(d_y, weight, routing, transpose_weight=True, scatter=gather)
        d_x = _sum_slots(d_rows, routing) if gather else d_rows
    if want_w:
        d_w = backend.expert_xty(d_y, x, routing, gather_b=gather)
    return d_x, d_w


class SwigluDownCombine(torch.autograd.Function):
    """``out[t] = sum_k w[t,k] * swiglu(gate_up[r]) @ W_down[e(r)]^T`` (no weights: ``K == 1``, unscaled)."""

    @staticmethod
    def forward(ctx, gate_up, down, routing: Routing, weights, backend: ModuleType, fuse: bool):
        ctx.save_for_backward(gate_up, _save_weight(ctx, down), weights)
        ctx.routing, ctx.backend, ctx.fuse = routing, backend, fuse
        return swiglu_down_combine(gate_up, _dense(down), routing, weights, backend, fuse)

    @staticmethod
    def backward(ctx, d_out):
        gate_up, down, weights = ctx.saved_tensors
        d_gate_up, d_down, d_weights = swiglu_down_backward(
            d_out, gate_up, _weight(ctx, down), routing=ctx.routing, weights=weights, backend=ctx.backend,
            fuse=ctx.fuse, want_down=ctx.needs_input_grad[1])
        return d_gate_up, d_down, None, d_weights, None, None


def swiglu_down_combine(gate_up, down, routing: Routing, weights, backend: ModuleType, fuse: bool) -> torch.Tensor:
    if fuse:
        rows = backend.expert_mm(gate_up, down, routing, swiglu=True, scatter=True, row_scale=weights)
    else:
        rows = backend.expert_mm(backend.swiglu(gate_up), down, routing, scatter=True, row_scale=weights)
    return _sum_slots(rows, routing)


def swiglu_down_backward(d_out, gate_up, down, *, routing: Routing, weights, backend: ModuleType, fuse: bool,
                         want_down: bool, overwrite_gate_up: bool = False):
    """Gradients of ``SwigluDownCombine`` for ``gate_up``, the down weight (None unless wanted) and the
    sorted-row routing weights (None without them).

    ``overwrite_gate_up``: the caller holds the only use of ``gate_up``, so its gradient is
    written over it. That saves a ``[rows, 2 * intermediate]`` tensor at the backward's peak
    (the gate/up weight gradient, computed next from this gradient).
    """
    d_out = d_out.to(down.dtype).contiguous()
    overwrite_gate_up = overwrite_gate_up and gate_up.is_contiguous()

    def fused_down_grad():  # rebuilds swiglu(gate_up) from gate_up's rows
        return backend.expert_xty(d_out, gate_up, routing, gather_a=True, swiglu_b=True, a_row_scale=weights)

    d_down = fused_down_grad() if want_down and fuse and overwrite_gate_up else None  # before the overwrite
    # g[r] = d_out[token(r)] @ W_down[e]: the gradient of the unscaled down projection input.
    g = backend.expert_mm(d_out, down, routing, gather=True, transpose_weight=True)
    d_gate_up, d_weights, scaled_h = backend.swiglu_backward(gate_up, g, weights, want_h=want_down and not fuse,
                                                             out=gate_up if overwrite_gate_up else None)
    del g  # a [rows, intermediate] tensor, else alive beside the down weight gradient's (the backward's peak)
    if want_down and d_down is None:
        d_down = fused_down_grad() if fuse else backend.expert_xty(d_out, scaled_h, routing, gather_a=True)
    if d_weights is not None:
        d_weights = d_weights.to(weights.dtype)
    return d_gate_up, d_down, d_weights


def _sum_slots(rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``[T*K, D]`` slot-order rows -> ``[T, D]`` (fp32 accumulation, like Hugging Face's)."""
    if routing.top_k == 1:
        return rows
    return rows.view(routing.num_tokens, routing.top_k, -1).sum(1, dtype=torch.float32).to(rows.dtype)


@dataclass
class ExpertLoRA:
    """One low-rank update per expert: ``delta W[e] = scale * b[e] @ a[e]``."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: float


def sorted_weights(top_k_weights: torch.Tensor, routing_slot: torch.Tensor) -> torch.Tensor:
    """The routing weights in sorted-row order, always fp32: routers hand them over in the model's dtype (bf16
    for Granite and Mixtral) or in fp32, and a kernel argument of another dtype is another Triton compilation, met
    mid-run when a batch first needs tall row tiles (s12c1: a 2.8 s step), after the warm-up had tuned fp32."""
    return top_k_weights.reshape(-1)[routing_slot.long()].float()


def _lora_rows(x, lora: ExpertLoRA, routing: Routing, gather: bool, backend: ModuleType) -> torch.Tensor:
    low = ExpertLinear.apply(x, lora.a.to(x.dtype), routing, gather, backend)
    return ExpertLinear.apply(low, lora.b.to(x.dtype), routing, False, backend) * lora.scale


def routed_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    backend: str = "triton",
    lora_gate_up: ExpertLoRA | None = None,
    lora_down: ExpertLoRA | None = None,
    fuse_swiglu: bool | None = None,
) -> torch.Tensor:
    """SwiGLU experts over ``[T, H]`` tokens routed to ``top_k_index`` ([T, K]).

    ``gate_up_proj: [E, 2I, H]`` and ``down_proj: [E, H, I]`` in Hugging Face's layout
    (tensors, or frozen 4-bit ``QuantizedExpertWeight``s).
    ``top_k_weights=None`` leaves the rows unscaled (expert parallelism scales them on
    the rank that owns the tokens). ``fuse_swiglu=None`` applies ``FUSE_SWIGLU_MAX_HIDDEN``.
    """
    impl = backend_module(backend)
    routing = route(top_k_index, gate_up_proj.size(0))
    x = hidden_states.to(gate_up_proj.dtype)
    gate_up = ExpertLinear.apply(x, gate_up_proj, routing, True, impl)
    if lora_gate_up is not None:
        gate_up = gate_up + _lora_rows(x, lora_gate_up, routing, True, impl)
    weights = None if top_k_weights is None else sorted_weights(top_k_weights, routing.slot)
    out = SwigluDownCombine.apply(gate_up, down_proj, routing, weights, impl, fuse_swiglu_for(down_proj, fuse_swiglu))
    if lora_down is not None:
        delta = _lora_rows(torch_kernels.swiglu_rows(gate_up), lora_down, routing, False, impl)
        if weights is not None:
            delta = delta * weights[:, None].to(delta.dtype)
        out = out + _sum_slots(delta[routing.inverse()], routing)
    return out.to(hidden_states.dtype)
