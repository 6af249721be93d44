"""Triton kernels with their autograd functions; each public op falls back to :mod:`..reference`."""

from .cross_entropy import cross_entropy
from .fused_linear_ce import fused_linear_cross_entropy, token_logprobs
from .lora import fused_lora
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu, swiglu_packed
from .vocab_parallel import token_logprobs_vocab_parallel

__all__ = [
    "cross_entropy",
    "fused_linear_cross_entropy",
    "fused_lora",
    "rms_norm",
    "rope",
    "swiglu",
    "swiglu_packed",
    "token_logprobs",
    "token_logprobs_vocab_parallel",
]
