"""The standard 4-bit GPTQ tensor layout, in plain torch.

This is the layout Hugging Face transformers/optimum, AutoGPTQ and GPTQModel write. A linear
layer with weight ``W [out_features, in_features]``, quantised in groups along the input
dimension, is stored as four tensors:

- ``qweight`` int32 ``[in_features // 8, out_features]``: eight 4-bit values packed along the
  *input* dimension; input row ``k`` sits in ``qweight[k // 8]`` at bits ``4 * (k % 8)``.
- ``qzeros`` int32 ``[n_groups, out_features // 8]``: zero points packed the same way along
  the *output* dimension.
- ``scales`` float16 ``[n_groups, out_features]``.
- ``g_idx`` int32 ``[in_features]``: the group of each input row; ``k // group_size`` unless
  the checkpoint was quantised with act-order (``desc_act``), where groups follow the order
  in which GPTQ visited the columns.

``W[o, k] = scales[g, o] * (q[k, o] - zero[g, o])`` with ``g = g_idx[k]``. Checkpoint format
v1 (``"gptq"``) stores ``zero - 1`` in ``qzeros``, v2 (``"gptq_v2"``) stores ``zero`` itself; the
kernels take the difference as ``zero_offset`` (1 for v1, 0 for v2) so both load unchanged.
"""

from __future__ import annotations

import torch

BITS = 4
PER_INT32 = 32 // BITS  # 4-bit values in one int32
MAXQ = 2**BITS - 1
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint format -> value added to the stored zero points


def zero_offset(checkpoint_format: str) -> int:
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"unknown GPTQ checkpoint format '{checkpoint_format}' (known: {', '.join(ZERO_OFFSET)})")
    return ZERO_OFFSET[checkpoint_format]


def sequential_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``g_idx`` without act-order: consecutive rows share a group (``group_size=-1``: one group)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // size


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2**32) as int32 bit patterns (what the checkpoints store)."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` ints in [0, 15] -> int32 ``[R // 8, C]``, packed along dim 0 (low bits first)."""
    rows, cols = values.shape
    if rows % PER_INT32:
        raise ValueError(f"cannot pack {rows} rows: not a multiple of {PER_INT32}")
    if values.min() < 0 or values.max() > MAXQ:
        raise ValueError(f"4-bit values must lie in [0, {MAXQ}]")
    shifts = torch.arange(PER_INT32, device=values.device, dtype=torch.int64).view(1, PER_INT32, 1) * BITS
    packed = (values.to(torch.int64).view(rows // PER_INT32, PER_INT32, cols) << shifts).sum(dim=1)
    return _to_int32(packed)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[R // 8, C]`` -> int32 ``[R, C]`` in [0, 15]."""
    shifts = torch.arange(PER_INT32, device=packed.device, dtype=torch.int32).view(1, PER_INT32, 1) * BITS
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts) & MAXQ  # arithmetic shift; the mask drops the sign
    return values.reshape(-1, packed.shape[1])


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` ints in [0, 15] -> int32 ``[R, C // 8]``, packed along dim 1."""
    return pack_rows(values.t().contiguous()).t().contiguous()


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    return unpack_rows(packed.t()).t().contiguous()


def pack(
    intweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Quantised layer -> the four checkpoint tensors.

    intweight: ``[out, in]`` ints in [0, 15]; zeros: ``[groups, out]`` true zero points;
    scales: ``[groups, out]``; g_idx: ``[in]``.
    """
    stored = zeros.to(torch.int64) - zero_offset(checkpoint_format)
    if stored.min() < 0:
        raise ValueError(f"format {checkpoint_format} cannot store zero point 0 (v1 stores zero - 1); use gptq_v2")
    return {
        "qweight": pack_rows(intweight.t().contiguous()),
        "qzeros": pack_cols(stored),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four tensors -> (intweight ``[out, in]``, true zero points ``[groups, out]``)."""
    return unpack_rows(qweight).t().contiguous(), unpack_cols(qzeros) + zero_offset(checkpoint_format)


def dequantize_torch(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    group_size: int = -1,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-torch dequantisation to ``W [out, in]``: the CPU path and the kernels' reference.

    ``g_idx=None`` means sequential groups of ``group_size`` rows.
    """
    q = unpack_rows(qweight)  # [in, out]
    zeros = unpack_cols(qzeros) + zero_offset  # [groups, out]
    if g_idx is None:
        g_idx = sequential_g_idx(q.shape[0], group_size, device=q.device)
    g = g_idx.long()
    weight = (q - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)
