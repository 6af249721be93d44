"""Triton helpers shared by the plugins' kernels.

Only kernel modules import this (it imports triton); specs and the CLI never do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function or an autotuner around one) runs in Triton's interpreter.

    Triton reads ``TRITON_INTERPRET=1`` when it decorates a kernel, not when it launches one, so the kernel
    object is what knows; the environment may have changed since.
    """
    candidates = (kernel, getattr(kernel, "fn", None))  # an autotuner keeps the kernel in .fn
    return any(type(k).__name__ == "InterpretedFunction" for k in candidates)


def exact_fp32_dot(dtype: torch.dtype, interpreting: bool) -> bool:
    """The ``DOT_FP32`` flag our kernels take: multiply in exact fp32 (``input_precision="ieee"``) for fp32
    operands, as cuBLAS does by default (no TF32), and always in the interpreter, whose ``tl.dot`` mishandles
    bf16 operands. ``interpreting``: :func:`is_interpreted` of the caller's kernels (decided once at import where
    the launch is code Dynamo traces, so that it does not inspect kernel objects)."""
    return dtype == torch.float32 or interpreting


@triton.jit
def grouped_tile_order(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """``(tile_m, tile_n)`` of program ``pid``, walking ``GROUP_M`` row tiles across all column tiles, so that the
    tiles they share stay in L2."""
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m
