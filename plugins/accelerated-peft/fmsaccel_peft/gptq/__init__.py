"""GPTQ-LoRA: 4-bit GPTQ checkpoints on our own Triton kernels, quantiser included.

- :mod:`.packing`: the standard tensor layout (pack/unpack, v1/v2 zero points, plain-torch dequantise);
- :mod:`.kernels`: Triton dequantise and fused dequantise+matmul (forward and grad-input);
- :mod:`.linear`: ``QuantLinear``, the frozen layer PEFT's LoRA wraps;
- :mod:`.loader`: meta-device loading of GPTQ checkpoints;
- :mod:`.quantize`: GPTQ and round-to-nearest, writing the standard layout;
- :mod:`.plugin`: the ``accelerated-peft-gptq`` plugin.
"""

from .kernels import dequantize, gptq_matmul
from .linear import QuantLinear
from .loader import load_quantized, read_quant_config
from .quantize import quantize_model

__all__ = ["QuantLinear", "dequantize", "gptq_matmul", "load_quantized", "quantize_model", "read_quant_config"]
