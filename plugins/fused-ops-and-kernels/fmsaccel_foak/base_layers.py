"""The frozen base layer under a LoRA adapter: what kind it is and its weight in full precision.

One branch per kind, so a new quantisation format is one more branch here:

- ``bitsandbytes``: ``bnb.nn.Linear4bit`` (nf4/fp4), dequantised by bitsandbytes;
- ``auto_gptq``: our GPTQ ``QuantLinear`` (``fmsaccel_peft.gptq``), dequantised by its Triton kernel;
- ``None``: a plain ``nn.Linear`` (bf16 LoRA), whose weight is used as it is.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("bitsandbytes", "auto_gptq", None)


def _is_bnb_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _is_gptq(module: nn.Module) -> bool:
    try:
        from fmsaccel_peft.gptq.linear import QuantLinear
    except ImportError:
        return False
    return isinstance(module, QuantLinear)


def base_layer_kind(module: nn.Module) -> str | None:
    """``bitsandbytes``, ``auto_gptq`` or ``None`` (plain linear); anything else is a ``TypeError``."""
    if _is_bnb_4bit(module):
        return "bitsandbytes"
    if _is_gptq(module):
        return "auto_gptq"
    if type(module) is nn.Linear:
        return None
    raise TypeError(f"unsupported base layer {type(module).__module__}.{type(module).__name__}")


def dequantize_base_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's ``[out, in]`` weight in ``dtype`` (a fresh tensor for quantised layers, the parameter otherwise)."""
    kind = base_layer_kind(module)
    if kind == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        weight = module.weight
        # under FSDP the gathered weight is a plain Parameter; bitsandbytes keeps the state on the module too
        state = getattr(weight, "quant_state", None) or module.quant_state
        return bnbf.dequantize_4bit(weight.data, state).to(dtype)
    if kind == "auto_gptq":
        return module.dequantize(dtype)
    return module.weight.to(dtype)


def is_quantized(module: nn.Module) -> bool:
    return base_layer_kind(module) is not None
