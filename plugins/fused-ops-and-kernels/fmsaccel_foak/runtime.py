"""Where a Triton kernel can run, and the one-time notice when it cannot.

A kernel runs on CUDA tensors, or on CPU tensors when Triton was imported with
``TRITON_INTERPRET=1`` (the kernel object is then an interpreted function: Triton
decides this when the kernel is decorated, not when it is launched). Anywhere else
the op uses its plain-torch reference from :mod:`fmsaccel_foak.reference`, which is
correct and slow, and says so once per op.
"""

from __future__ import annotations

import logging

import torch

from fmsaccel_framework.triton_utils import is_interpreted

logger = logging.getLogger("fmsaccel_foak")
_noticed: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` is seen (not while compiling: the plugin's report says it then)."""
    if not torch.compiler.is_compiling() and key not in _noticed:
        _noticed.add(key)
        logger.warning("fmsaccel_foak: %s", message)


def can_launch(kernel, tensor: torch.Tensor) -> bool:
    """True when ``kernel`` can run on ``tensor``'s device; otherwise note the fallback once."""
    if tensor.is_cuda or (tensor.device.type == "cpu" and is_interpreted(kernel)):
        return True
    op = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    notice_once(op, f"{op} cannot run on {tensor.device.type} without a GPU or TRITON_INTERPRET=1; "
                    "using the plain-torch reference")
    return False


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels will run for tensors on ``device`` (for the patch report)."""
    from .ops.rms_norm import _rms_norm_fwd_kernel

    return torch.device(device).type == "cuda" or is_interpreted(_rms_norm_fwd_kernel)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def num_warps(elements: int) -> int:
    """Warps for a tile of ``elements`` values: about 16-32 values per thread."""
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def row_block(n_cols: int, n_rows: int, elements: int = 4096) -> int:
    """Rows per program: about ``elements`` values per tile, a power of two, at most the rows there are.

    On the GPU one long row per program is the norm; small rows are packed several to a
    program. Under the interpreter each program costs milliseconds of Python, so small
    test shapes collapse into a few programs.
    """
    import triton

    rows = max(1, elements // triton.next_power_of_2(n_cols))
    return max(1, min(triton.next_power_of_2(max(n_rows, 1)), triton.next_power_of_2(rows)))
