"""SwiGLU ``silu(gate) * up``: one read of gate and up, one write; the backward recomputes silu.

Two entry points share the kernels: :func:`swiglu` for separate gate/up tensors (dense
MLPs) and :func:`swiglu_packed` for the ``[..., 2 * I]`` gate-up output of MoE experts,
whose gradient is written straight into one packed buffer (no chunk/cat copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..runtime import can_launch, num_warps, row_block


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_fwd_kernel(
    G, U, Y, n_rows, n_cols, stride_g, stride_u, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, n_rows, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A 2D view ``[rows, n_cols]`` with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    block_n = min(triton.next_power_of_2(n_cols), 2048)
    block_m = row_block(block_n, n_rows)
    return (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n)), block_m, block_n


def _empty_output(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    return torch.empty(u2.shape, dtype=torch.promote_types(g2.dtype, u2.dtype), device=g2.device)


def _launch_forward(g, u, y, n_rows: int, n_cols: int, stride_g: int, stride_u: int, stride_y: int) -> None:
    grid, block_m, block_n = _grid(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](g, u, y, n_rows, n_cols, stride_g, stride_u, stride_y,
                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n))


def _forward(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    y = _empty_output(g2, u2)
    _launch_forward(g2, u2, y, *u2.shape, g2.stride(0), u2.stride(0), y.stride(0))
    return y


def _backward(dy2, g2, u2, dg2, du2) -> None:
    n_rows, n_cols = u2.shape
    grid, block_m, block_n = _grid(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](dy2, g2, u2, dg2, du2, n_rows, n_cols, dy2.stride(0), g2.stride(0), u2.stride(0),
                             dg2.stride(0), du2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                             num_warps=num_warps(block_m * block_n))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, output_deferred: bool, grads_in_place: bool):
        n = gate.shape[-1]
        g2, u2 = _rows(gate, n), _rows(up, n)
        ctx.save_for_backward(g2, u2)
        ctx.shapes = (gate.shape, up.shape)
        ctx.grads_in_place = grads_in_place
        y = _empty_output(g2, u2) if output_deferred else _forward(g2, u2)
        return y.view(*gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        # in place: each element's gate and up are read before its gradients are written over them
        dg2, du2 = (g2, u2) if ctx.grads_in_place else (torch.empty_like(g2), torch.empty_like(u2))
        _backward(_rows(dy, g2.shape[1]), g2, u2, dg2, du2)
        return dg2.view(ctx.shapes[0]), du2.view(ctx.shapes[1]), None, None


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        packed = _rows(gate_up, gate_up.shape[-1])
        n = packed.shape[1] // 2
        ctx.save_for_backward(packed)
        ctx.shape = gate_up.shape
        return _forward(packed[:, :n], packed[:, n:]).view(*gate_up.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (packed,) = ctx.saved_tensors
        n = packed.shape[1] // 2
        grad = torch.empty_like(packed)
        _backward(_rows(dy, n), packed[:, :n], packed[:, n:], grad[:, :n], grad[:, n:])
        return grad.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, grads_in_place: bool = False,
           output_if_recompute_goes_on: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes).

    ``grads_in_place``: the backward writes the gradients over the saved ``gate`` and ``up``
    (no two new intermediate-size buffers at the backward's peak); only for callers whose
    ``gate`` and ``up`` nothing else reads afterwards, and no second backward.
    ``output_if_recompute_goes_on``: for a checkpoint recompute, where only the saved
    ``gate`` and ``up`` matter. When they are the last tensors the layer saves, torch's
    early-stopping recompute ends as they are saved, inside this call, and the output is
    never computed; when the call returns, something after it still saves, so the output is
    computed then.
    """
    if not can_launch(_swiglu_fwd_kernel, gate):
        return reference.swiglu(gate, up)
    # deferred only where the late launch needs no view: selective checkpointing replays torch ops by count
    defer = output_if_recompute_goes_on and gate.is_contiguous() and up.is_contiguous() and gate.shape == up.shape
    y = _SwiGLU.apply(gate, up, defer, grads_in_place)
    if defer:
        n = gate.shape[-1]
        _launch_forward(gate, up, y, gate.numel() // max(n, 1), n, n, n, n)
    return y


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = cat([gate, up], -1)`` (the MoE experts' layout)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"packed gate/up needs an even last dimension, got {gate_up.shape[-1]}")
    if not can_launch(_swiglu_fwd_kernel, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return reference.swiglu(gate, up)
    return _SwiGLUPacked.apply(gate_up)
