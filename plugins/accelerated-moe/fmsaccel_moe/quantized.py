"""Frozen expert weights kept 4-bit for QLoRA on MoE models.

bitsandbytes quantises ``nn.Linear`` layers only, so a 4-bit MoE model still holds its
3-D expert weights (almost all of its parameters) in 16 bits. With QLoRA the plugin
re-stores them with bitsandbytes' blockwise 4-bit format (the model's ``nf4``/``fp4``,
blocksize 64, fp32 absmax), and the expert ops dequantise a layer's weight when they
need it, in forward and again in backward: at most one layer's 16-bit copy exists at a
time, and autograd keeps the 4-bit form.
"""

from __future__ import annotations

import torch


class QuantizedExpertWeight(torch.nn.Module):
    """``[E, out, in]`` weight in 4 bits; ``dequantize()`` gives it back in its original dtype."""

    def __init__(self, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64):
        super().__init__()
        import bitsandbytes.functional as bnbf

        # quantised flat: blocks then run along the whole tensor (bitsandbytes' CPU path mishandles
        # rows shorter than a block)
        packed, state = bnbf.quantize_4bit(
            weight.detach().reshape(-1), blocksize=blocksize, quant_type=quant_type, compress_statistics=False
        )
        # not persistent: QLoRA saves the adapter; a full checkpoint must come from the 16-bit model
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.quant_type = quant_type
        self.blocksize = blocksize

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        numel = 1
        for n in self.shape:
            numel *= n
        state = bnbf.QuantState(
            absmax=self.absmax, shape=torch.Size([numel]), dtype=self.dtype, blocksize=self.blocksize,
            quant_type=self.quant_type,
        )
        return bnbf.dequantize_4bit(self.packed, state).view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.quant_type}, blocksize={self.blocksize}, dtype={self.dtype}"


def quantize_experts(experts: torch.nn.Module, quant_type: str) -> None:
    """Replace ``gate_up_proj`` / ``down_proj`` of one experts module by 4-bit holders (frozen)."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        if weight.requires_grad:
            raise ValueError(f"{name} is trainable; only frozen expert weights can be kept 4-bit")
        holder = QuantizedExpertWeight(weight, quant_type=quant_type)
        delattr(experts, name)
        setattr(experts, name, holder)


def four_bit_quant_type(model) -> str | None:
    """``nf4``/``fp4`` when the model was loaded 4-bit by bitsandbytes, else None."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    if not get("load_in_4bit", False):
        return None
    return get("bnb_4bit_quant_type", "nf4") or "nf4"
