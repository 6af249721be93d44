"""Triton kernels for 4-bit GPTQ weights, and the autograd op that picks one per call.

A GPTQ linear layer computes ``y = x @ W^T`` forward and ``dx = dy @ W`` backward (the
quantised weights are frozen, so there is no weight gradient). Three ways to do it:

- ``fused``: a GEMM that dequantises each weight tile in registers right before ``tl.dot``.
  It reads only the 4-bit weights, so it wins when there are few tokens (memory-bound).
- ``dequant``: a Triton kernel writes ``W`` once in the activation dtype into a temporary,
  then cuBLAS does the matmul. The temporary (one layer's weight) is freed right after the
  call; at training token counts (1k-16k) cuBLAS' speed outweighs the extra write.
- ``torch``: the plain-torch dequantise of :mod:`.packing`, used on the CPU.

``backend="auto"`` picks ``fused`` up to :data:`FUSED_MAX_TOKENS` tokens on CUDA, ``dequant``
above, ``torch`` elsewhere. Set ``FMSACCEL_GPTQ_FUSED_MAX_TOKENS`` to move the threshold.

All kernels share :func:`_weight_tile`, which dequantises ``W^T[k, n]`` (the checkpoint's own
``[in, out]`` orientation) for any ``g_idx`` (act-order), group size and zero-point format.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fmsaccel_framework.triton_utils import exact_fp32_dot, grouped_tile_order, is_interpreted

from .packing import dequantize_torch

FUSED_MAX_TOKENS = int(os.environ.get("FMSACCEL_GPTQ_FUSED_MAX_TOKENS", "256"))
BACKENDS = ("auto", "fused", "dequant", "torch")


def _interpreting() -> bool:
    return _INTERPRETING


# Set to a config dict (e.g. by a GPU correctness check) to launch without autotuning: every new
# group size, dtype or act-order combination otherwise compiles and times all the configs below.
PINNED_MATMUL: dict | None = None
PINNED_DEQUANT: dict | None = None


@triton.jit
def _weight_tile(
    qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_k, offs_n, k_start, K, N,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Dequantised tile ``W^T[offs_k, offs_n]`` in fp32; the tile's rows start at ``k_start``."""
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    # each int32 holds 8 consecutive input rows; the 8 rows sharing it hit the cache
    q = tl.load(qweight_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    q = (q >> ((offs_k % 8) * 4)[:, None]) & 0xF
    zero_shift = ((offs_n % 8) * 4)[None, :]
    if HAS_G_IDX:  # act-order: every row names its group
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)[:, None]
        scale = tl.load(scales_ptr + g * N + offs_n[None, :], mask=mask, other=0.0)
        zero = tl.load(qzeros_ptr + g * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0)
    elif GROUP_SIZE % BLOCK_K == 0:  # the whole tile lies in one group: one row of scales and zeros
        g = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        zero = tl.load(qzeros_ptr + g * (N // 8) + offs_n // 8, mask=mask_n, other=0)[None, :]
    else:
        g = (offs_k // GROUP_SIZE)[:, None]
        scale = tl.load(scales_ptr + g * N + offs_n[None, :], mask=mask, other=0.0)
        zero = tl.load(qzeros_ptr + g * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0)
    zero = ((zero >> zero_shift) & 0xF) + ZERO_OFFSET
    return (q - zero).to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, K, N,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k_start = tl.program_id(0) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_k, offs_n, k_start, K, N,
                     GROUP_SIZE, HAS_G_IDX, ZERO_OFFSET, BLOCK_K)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _fused_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, ZERO_OFFSET: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W^T[K, N]`` (M_BUCKET only keys the autotuner)."""
    pid_m, pid_n = grouped_tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_k, offs_n, k_start, K, N,
                         GROUP_SIZE, HAS_G_IDX, ZERO_OFFSET, BLOCK_K)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")  # fp32 stays fp32 (no tf32)
        else:
            acc += tl.dot(a, w.to(a.dtype))
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _fused_grad_input_kernel(
    dy_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm, M_BUCKET,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, ZERO_OFFSET: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dx[M, K] = dy[M, N] @ W[N, K]``: output tiles over (M, K), reduction over N."""
    pid_m, pid_k = grouped_tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        g = tl.load(dy_rows + offs_n[None, :], mask=mask_m[:, None] & (offs_n < N)[None, :], other=0.0)
        w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_k, offs_n, k_start, K, N,
                         GROUP_SIZE, HAS_G_IDX, ZERO_OFFSET, BLOCK_K)
        if DOT_FP32:
            acc += tl.dot(g.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(g, tl.trans(w.to(g.dtype)))
    dx = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_k < K)[None, :])


def _matmul_configs() -> list[triton.Config]:
    shapes = [(16, 32, 128, 2, 4), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
              (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _grad_input_configs() -> list[triton.Config]:
    # output tile is (BLOCK_M, BLOCK_K); BLOCK_N is the reduction step
    shapes = [(16, 128, 32, 2, 4), (16, 128, 64, 4, 4), (32, 128, 64, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3),
              (128, 64, 128, 8, 3), (128, 64, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _dequantize_configs() -> list[triton.Config]:
    shapes = [(32, 128, 4), (64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 256, 8)]
    return [triton.Config({"BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=2) for k, n, w in shapes]


_TUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_G_IDX", "DOT_FP32"]
_fused_matmul_tuned = triton.autotune(_matmul_configs(), key=_TUNE_KEY)(_fused_matmul_kernel)
_fused_grad_input_tuned = triton.autotune(_grad_input_configs(), key=_TUNE_KEY)(_fused_grad_input_kernel)
_dequantize_tuned = triton.autotune(_dequantize_configs(), key=["N", "K", "GROUP_SIZE", "HAS_G_IDX"])(
    _dequantize_kernel
)
# Triton picks the interpreter when a kernel is decorated, so this is known at import; a constant (not a check at
# each launch) also keeps torch.compile from tracing into the kernel object (foak's compile_layers)
_INTERPRETING = is_interpreted(_dequantize_kernel)
# the interpreter (CPU tests) runs one small config; autotuning there would only cost time
_INTERPRET_MATMUL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
_INTERPRET_DEQUANT = {"BLOCK_K": 32, "BLOCK_N": 32}


def _check_weight(qweight, scales, qzeros, g_idx, group_size) -> tuple[int, int, int]:
    """Validate the packed tensors; return (K, N, the group size as the kernels see it)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, N) or qzeros.shape != (groups, N // 8) or N % 8:
        raise ValueError(f"inconsistent GPTQ tensors: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}")
    if g_idx is not None and g_idx.shape != (K,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({K},)")
    size = K if group_size == -1 else group_size
    if g_idx is None and -(-K // size) != groups:
        raise ValueError(f"{groups} groups of scales do not match in_features {K} with group_size {group_size}")
    return K, N, size


def _weight_args(qweight, scales, qzeros, g_idx):
    return (qweight.contiguous(), scales.contiguous(), qzeros.contiguous(),
            g_idx.to(torch.int32).contiguous() if g_idx is not None else qweight)  # any pointer when unused


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    group_size: int = -1,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantise a GPTQ weight with Triton: ``W [out, in]`` in ``dtype``.

    The result is a transposed view of a contiguous ``[in, out]`` buffer (the checkpoint's
    orientation, which the kernel writes fastest); ``F.linear``/``matmul`` take it as is.
    ``g_idx=None`` means sequential groups of ``group_size`` rows (faster than passing the
    trivial g_idx); pass the checkpoint's ``g_idx`` for act-order weights.
    """
    K, N, size = _check_weight(qweight, scales, qzeros, g_idx, group_size)
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    args = (*_weight_args(qweight, scales, qzeros, g_idx), out, K, N)
    flags = dict(GROUP_SIZE=size, HAS_G_IDX=g_idx is not None, ZERO_OFFSET=zero_offset)
    if _interpreting() or PINNED_DEQUANT:
        config = _INTERPRET_DEQUANT if _interpreting() else PINNED_DEQUANT
        grid = (triton.cdiv(K, config["BLOCK_K"]), triton.cdiv(N, config["BLOCK_N"]))
        _dequantize_kernel[grid](*args, **flags, **config)
    else:
        _dequantize_tuned[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args, **flags
        )
    return out.t()


def _bucket(tokens: int) -> int:
    """Token counts that share autotuned configs (variable sequence lengths must not retune)."""
    return min(triton.next_power_of_2(max(tokens, 16)), 8192)


def _launch_fused(a: torch.Tensor, qweight, scales, qzeros, g_idx, group_size, zero_offset, grad_input: bool):
    K, N, size = _check_weight(qweight, scales, qzeros, g_idx, group_size)
    M = a.shape[0]
    if a.shape[1] != (N if grad_input else K):
        raise ValueError(f"activation has {a.shape[1]} features, the weight expects {N if grad_input else K}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    out = torch.empty(M, K if grad_input else N, dtype=a.dtype, device=a.device)
    args = (a, *_weight_args(qweight, scales, qzeros, g_idx), out, M, N, K, a.stride(0), out.stride(0), _bucket(M))
    flags = dict(GROUP_SIZE=size, HAS_G_IDX=g_idx is not None, ZERO_OFFSET=zero_offset,
                 DOT_FP32=exact_fp32_dot(a.dtype, _interpreting()))
    out_cols, block = (K, "BLOCK_K") if grad_input else (N, "BLOCK_N")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(out_cols, meta[block]),)
    if _interpreting() or PINNED_MATMUL:
        config = _INTERPRET_MATMUL if _interpreting() else PINNED_MATMUL
        kernel = _fused_grad_input_kernel if grad_input else _fused_matmul_kernel
        kernel[grid(config)](*args, **flags, **config)
    else:
        kernel = _fused_grad_input_tuned if grad_input else _fused_matmul_tuned
        kernel[grid](*args, **flags)
    return out


def fused_matmul(x2d, qweight, scales, qzeros, g_idx=None, *, group_size=-1, zero_offset=1) -> torch.Tensor:
    """``x2d [M, in] @ W^T -> [M, out]`` with dequantisation inside the GEMM."""
    return _launch_fused(x2d, qweight, scales, qzeros, g_idx, group_size, zero_offset, grad_input=False)


def fused_matmul_grad_input(dy2d, qweight, scales, qzeros, g_idx=None, *, group_size=-1, zero_offset=1):
    """``dy2d [M, out] @ W -> [M, in]``: the input gradient, dequantising inside the GEMM."""
    return _launch_fused(dy2d, qweight, scales, qzeros, g_idx, group_size, zero_offset, grad_input=True)


def resolve_backend(backend: str, tokens: int, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown GPTQ backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    return "fused" if tokens <= FUSED_MAX_TOKENS else "dequant"


def _product(a2d, weight, backend: str, grad_input: bool) -> torch.Tensor:
    """``a @ W^T`` (forward) or ``a @ W`` (grad_input) with a concrete backend."""
    qweight, scales, qzeros, g_idx, group_size, zero_offset = weight
    if backend == "fused":
        return _launch_fused(a2d, qweight, scales, qzeros, g_idx, group_size, zero_offset, grad_input)
    dequant = dequantize if backend == "dequant" else dequantize_torch
    w = dequant(qweight, scales, qzeros, g_idx, group_size=group_size, zero_offset=zero_offset, dtype=a2d.dtype)
    return a2d @ (w if grad_input else w.t())


class _GPTQMatmul(torch.autograd.Function):
    """Saves no tensor: the frozen quantised weight rides on ``ctx`` as a plain attribute.

    Non-reentrant activation checkpointing stops its recompute once every tensor the forward
    saved has been saved again. A layer whose last matmul saves nothing (Llama's MLP down
    projection without LoRA) therefore never reruns that matmul; saving the weight through
    ``save_for_backward`` would make the recompute run it only to re-save a constant.
    """

    @staticmethod
    def forward(ctx, x, qweight, scales, qzeros, g_idx, group_size, zero_offset, backend):
        weight = (qweight, scales, qzeros, g_idx, group_size, zero_offset)
        ctx.weight, ctx.backend = weight, backend
        x2d = x.reshape(-1, x.shape[-1])
        y = _product(x2d, weight, resolve_backend(backend, x2d.shape[0], x.device), grad_input=False)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = _product(dy2d, ctx.weight, resolve_backend(ctx.backend, dy2d.shape[0], dy.device), grad_input=True)
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, None, None, None, None, None, None


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    group_size: int = -1,
    zero_offset: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """``x [..., in] @ W^T -> [..., out]``, differentiable in ``x`` (the weight is frozen)."""
    return _GPTQMatmul.apply(x, qweight, scales, qzeros, g_idx, group_size, zero_offset, backend)
