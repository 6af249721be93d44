"""The same three expert primitives as ``triton_kernels``, in PyTorch.

Rows are gathered with ``index_select`` and the per-expert GEMMs run through torch's
``grouped_mm`` (``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``, whichever
this torch has) when it supports the device, dtype and strides, else through a loop
over experts. This is the ``grouped_mm`` backend on the GPU and the CPU fallback; the
tests also use it as a second, independent implementation of the kernels' contract.

SwiGLU and its gradient are elementwise: on CUDA they run as the Triton backend's fused row
kernels (one pass, no fp32 temporaries, one launch), so this backend differs from it only in
the GEMMs (``elementwise_in_triton``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import Routing

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_name() -> str | None:
    """Which torch grouped GEMM this torch provides (for the patch report)."""
    if hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm"
    if hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm"
    return None


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's grouped GEMM wants bf16 on sm80+ CUDA, and 16-byte aligned strides everywhere."""
    if _GROUPED_MM is None or not (_aligned(a) and _aligned(b)):
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu"


def _rows(a: torch.Tensor, routing: Routing, gather: bool) -> torch.Tensor:
    return a.index_select(0, routing.token.long()) if gather else a


# fp32 temporaries of at most 64 MiB each: where SwiGLU and its gradient run in torch (not `elementwise_in_triton`:
# the CPU), they run over row chunks of this many elements. Done whole at the mixtral-8x7b shape (16k expert rows of
# 14,336 in a padded R batch), the gradient's fp32 temporaries came to ~20 rows-by-intermediate bf16 tensors (~9 GB;
# s12c3, on the GPU before the Triton row kernels: LoRA at 1.37x plain transformers' memory).
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def elementwise_in_triton(t: torch.Tensor) -> bool:
    """Whether SwiGLU and its gradient on ``t`` run as the Triton row kernels: on CUDA. In torch, over row chunks,
    they launch about ten kernels a chunk and keep fp32 temporaries of ``CHUNK_ELEMENTS`` each (s13c1: mixtral-shaped
    LoRA at 1.05x plain transformers' peak, from the chunks of the gradient)."""
    return t.is_cuda


def swiglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[gate | up]`` rows, computed in fp32 like the kernels."""
    inter = gate_up.size(-1) // 2
    if torch.is_grad_enabled() and gate_up.requires_grad:  # autograd (LoRA on experts) records the plain ops
        gate, up = gate_up[..., :inter].float(), gate_up[..., inter:].float()
        return (F.silu(gate) * up).to(gate_up.dtype)
    if elementwise_in_triton(gate_up):
        from . import triton_kernels

        return triton_kernels.swiglu(gate_up.reshape(-1, gate_up.size(-1))).view(*gate_up.shape[:-1], inter)
    rows = gate_up.reshape(-1, gate_up.size(-1))
    out = rows.new_empty(rows.size(0), inter)
    for start, end in _row_chunks(rows.size(0), inter):
        gate = rows[start:end, :inter].to(torch.float32, copy=True)  # silu in place: never on the input
        out[start:end] = F.silu(gate, inplace=True).mul_(rows[start:end, inter:])
    return out.view(*gate_up.shape[:-1], inter)


def _mm_groups(x: torch.Tensor, w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``x[group e] @ w[e]`` for ``w: [E, K, N]``."""
    if grouped_mm_supported(x, w):
        return _GROUPED_MM(x, w, offs=routing.ends.to(torch.int32))
    out = x.new_zeros(x.size(0), w.size(2))
    start = 0
    for e, end in enumerate(routing.ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def _xty_groups(a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``a[group e]^T @ b[group e]`` -> ``[E, M, N]``."""
    a_t = a.t()
    if grouped_mm_supported(a_t, b):
        return _GROUPED_MM(a_t, b, offs=routing.ends.to(torch.int32))
    out = a.new_zeros(routing.num_experts, a.size(1), b.size(1))
    start = 0
    for e, end in enumerate(routing.ends.tolist()):
        if end > start:
            out[e] = a[start:end].t() @ b[start:end]
        start = end
    return out


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
    """See ``triton_kernels.expert_mm``."""
    x = _rows(a, routing, gather)
    if swiglu:
        x = swiglu_rows(x)
    w = weight if transpose_weight else weight.transpose(1, 2)
    if not grouped_mm_supported(x, w):
        w = w.contiguous()
    y = _mm_groups(x, w, routing)
    if row_scale is not None:  # in place, multiplied in fp32 and rounded once (as (y.float() * s).to(y.dtype))
        y = y.mul_(row_scale.float()[:, None])
    if scatter:
        out = torch.empty_like(y)
        out[routing.slot.long()] = y
        return out
    return y


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
    """See ``triton_kernels.expert_xty``."""
    a_rows = _rows(a, routing, gather_a)
    if a_row_scale is not None:  # multiplied in fp32, rounded once; in place on a gathered copy
        scale = a_row_scale.float()[:, None]
        a_rows = a_rows.mul_(scale) if gather_a else (a_rows * scale).to(a.dtype)
    b_rows = _rows(b, routing, gather_b)
    if swiglu_b:
        b_rows = swiglu_rows(b_rows)
    return _xty_groups(a_rows.contiguous(), b_rows.contiguous(), routing)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """See ``triton_kernels.swiglu``."""
    return swiglu_rows(gate_up)


def swiglu_backward(
    gate_up: torch.Tensor, grad: torch.Tensor, row_scale: torch.Tensor | None, *, want_h: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """See ``triton_kernels.swiglu_backward``. In fp32, over row chunks (``CHUNK_ELEMENTS``), or in Triton."""
    if elementwise_in_triton(gate_up):
        from . import triton_kernels

        return triton_kernels.swiglu_backward(gate_up, grad, row_scale, want_h=want_h, out=out)
    rows, inter = gate_up.size(0), gate_up.size(1) // 2
    d_gate_up = out if out is not None else gate_up.new_empty(rows, 2 * inter)
    d_scale = gate_up.new_empty(rows, dtype=torch.float32) if row_scale is not None else None
    h = gate_up.new_empty(rows, inter) if want_h else None
    for start, end in _row_chunks(rows, inter):
        chunk = slice(start, end)
        gate, up, g = gate_up[chunk, :inter].float(), gate_up[chunk, inter:].float(), grad[chunk].float()
        scale = row_scale[chunk].float()[:, None] if row_scale is not None else None
        sig = torch.sigmoid(gate)
        silu = gate * sig
        if scale is not None:
            d_scale[chunk] = (g * silu * up).sum(1)
        dh = g * scale if scale is not None else g
        d_gate, d_up = dh * up * sig * (1 + gate * (1 - sig)), dh * silu
        if want_h:  # before the stores: with out=gate_up (fp32) gate and up are views of what they overwrite
            h[chunk] = silu * up * scale if scale is not None else silu * up
        d_gate_up[chunk, :inter] = d_gate
        d_gate_up[chunk, inter:] = d_up
    return d_gate_up, d_scale, h
