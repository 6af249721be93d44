"""FP8 matmuls for the frozen base weights of LoRA layers: row-wise scaled e4m3, bf16 out.

At long sequences a QLoRA step is bound by the frozen base matmuls (forward, checkpoint
recompute and input gradient: about 57 % of a llama3-8b step on the H100 at 16k tokens).
Hopper runs e4m3 matmuls at twice the bf16 rate, so these three run in FP8 when asked:

- forward ``y = x @ W^T``: ``x`` quantised per token (row), ``W`` per output channel;
- input gradient ``dx = dy @ W``: ``dy`` per token, ``W`` per input channel (the scale must
  not vary along the summed dimension), from a transposed copy.

Each scale is the row's absolute maximum over 448 (e4m3's largest value), so no value
saturates; the error is e4m3's rounding, about 2^-4 relative per element. LoRA's own
matmuls, the weight gradients of the adapters and everything else stay in the compute dtype.
``torch._scaled_mm`` (cuBLASLt) runs the matmul; one Triton kernel quantises a row in
two reads and one write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import can_launch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_ROWS = 4096  # below this many tokens the bf16 matmul is as fast (launch- and quantisation-bound)


@triton.jit
def _quantize_rows_kernel(X, Q, S, n_cols, stride_x, stride_q, FP8_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        x = tl.load(X + row * stride_x + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
    tl.store(S + row, scale)
    inv = 1.0 / scale
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX)
        # round to the e4m3 grid in fp32 (3 mantissa bits; subnormal spacing below 2^-6), so that the cast is exact
        # and the result does not depend on the cast's rounding (Triton's interpreter rounds without carry)
        mag = tl.abs(q)
        ulp = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(mag, 1e-30))), -6.0) - 3.0)
        steps = mag / ulp
        r = tl.floor(steps + 0.5)
        odd = r - 2.0 * tl.floor(r * 0.5)
        r = tl.where((r - steps == 0.5) & (odd == 1.0), r - 1.0, r)  # ties to even, as the hardware cast
        q = tl.where(q < 0, -1.0, 1.0) * r * ulp
        tl.store(Q + row * stride_q + start + cols, q.to(Q.dtype.element_ty), mask=mask)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``x ≈ q * scale``: ``q`` e4m3 ``[M, K]``, ``scale`` fp32 ``[M, 1]`` (row absmax / 448)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if not can_launch(_quantize_rows_kernel, x):
        return quantize_rows_reference(x)
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=E4M3, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    if n_rows:
        block = min(triton.next_power_of_2(n_cols), 2048)
        _quantize_rows_kernel[(n_rows,)](x, q, scale, n_cols, x.stride(0), q.stride(0), FP8_MAX=E4M3_MAX,
                                         BLOCK_N=block, num_warps=4 if block <= 1024 else 8)
    return q, scale


def supported(device: torch.device) -> bool:
    """FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); CPUs run them too."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def applies(x2: torch.Tensor) -> bool:
    """FP8 pays for ``x2 [tokens, features]``: enough tokens, a device that has it, a width cuBLASLt takes.

    On CUDA, row-wise scaled matmuls write bf16 only, so other compute dtypes keep their matmuls.
    """
    dtype_ok = x2.dtype == torch.bfloat16 or x2.device.type == "cpu"
    return x2.shape[0] >= MIN_ROWS and x2.shape[1] % 16 == 0 and dtype_ok and supported(x2.device)


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, extra))


class QuantizedInput:
    """An activation quantised once, for every projection that reads it (q/k/v or gate/up share one)."""

    def __init__(self, x2: torch.Tensor):
        self.rows = x2.shape[0]
        self.q, self.scale = quantize_rows(_pad_rows(x2))


def linear(x: QuantizedInput, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ w.T`` with ``w`` ``[N, K]`` quantised per output channel; ``[rows, N]`` in ``out_dtype``."""
    wq, w_scale = quantize_rows(w)
    y = torch._scaled_mm(x.q, wq.t(), scale_a=x.scale, scale_b=w_scale.t(), out_dtype=out_dtype)
    return y[: x.rows]


def input_grad(dy: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``dy @ w`` (``dy`` ``[M, N]``, ``w`` ``[N, K]``): :func:`linear` against ``w``'s transpose ``[K, N]``, whose
    rows are the input channels, so each gets its own scale (none varies along the summed dimension)."""
    return linear(QuantizedInput(dy), w.t().contiguous(), out_dtype)
