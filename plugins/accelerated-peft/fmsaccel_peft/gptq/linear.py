"""``QuantLinear``: a frozen 4-bit GPTQ linear layer that PEFT's LoRA wraps like any linear.

It subclasses ``nn.Linear`` (with ``weight = None``) so PEFT's default LoRA dispatch takes
it as it is: LoRA adapters sit on top, adapters save and reload with plain PEFT calls, and
no PEFT internals are patched. PEFT finds the layer's device through ``qweight`` (it looks
for that name for GPTQ layers). Code that needs the weight itself calls :meth:`dequantize`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels import BACKENDS, dequantize, gptq_matmul
from .packing import dequantize_torch, num_groups, sequential_g_idx

logger = logging.getLogger(__name__)
_warned_cpu = False


def _warn_cpu_once(device: torch.device) -> None:
    global _warned_cpu
    if not _warned_cpu:
        _warned_cpu = True
        logger.warning(
            "GPTQ QuantLinear on %s: the Triton kernels need CUDA, so 4-bit weights are dequantised with plain "
            "torch on every call (correct, slow; meant for small models)", device.type.upper()
        )


class QuantLinear(nn.Linear):
    """4-bit GPTQ weights in the standard layout (see :mod:`.packing`), frozen; grads flow to the input.

    ``backend`` picks the matmul: ``auto`` (default: Triton on CUDA, plain torch elsewhere),
    ``fused``, ``dequant`` or ``torch`` (see :mod:`.kernels`).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        *,
        group_size: int,
        zero_offset: int = 1,
        backend: str = "auto",
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no full-precision weight to allocate
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        groups = num_groups(in_features, group_size)
        expected = {"qweight": (in_features // 8, out_features), "qzeros": (groups, out_features // 8),
                    "scales": (groups, out_features), "g_idx": (in_features,), "bias": (out_features,)}
        for name, tensor in (("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx), ("bias", bias)):
            if tensor is not None and tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} for a "
                                 f"{in_features}->{out_features} layer with group_size {group_size}")
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown GPTQ backend '{backend}' (known: {', '.join(BACKENDS)})")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.zero_offset, self.backend = group_size, zero_offset, backend
        sequential = sequential_g_idx(in_features, group_size, device=qweight.device)
        g_idx = sequential if g_idx is None else g_idx.to(torch.int32)
        # act-order checkpoints need the per-row group lookup; the others take the faster sequential path
        self.act_order = not torch.equal(g_idx, sequential)
        self.register_parameter("weight", None)
        self._native_dtypes: dict[str, torch.dtype] = {}  # packed tensors held in another dtype (FSDP)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    PACKED = ("qweight", "qzeros", "scales", "g_idx")

    def use_float_storage(self, dtype: torch.dtype) -> None:
        """Hold the packed tensors as frozen ``dtype`` parameters (the same bytes, reinterpreted) so FSDP shards them.

        FSDP shards floating-point parameters only and leaves buffers replicated on every rank: for an 8B model
        that is 3.5 GiB of 4-bit weights per GPU. FSDP gathers the bytes as they are when ``dtype`` is its
        parameter dtype (``torch_dtype``), and the kernels read them back in their own dtypes.
        """
        for name in self.PACKED:
            tensor = getattr(self, name)
            if tensor.dtype == dtype:
                continue
            if (tensor.shape[-1] * tensor.element_size()) % dtype.itemsize:
                raise ValueError(f"{name} {tuple(tensor.shape)} cannot be stored as {dtype}")
            del self._buffers[name]
            setattr(self, name, nn.Parameter(tensor.view(dtype), requires_grad=False))
            self._native_dtypes[name] = tensor.dtype

    def _packed(self, name: str) -> torch.Tensor:
        tensor = getattr(self, name)
        native = self._native_dtypes.get(name)
        return tensor if native is None else tensor.view(native)

    def _kernel_args(self):
        g_idx = self._packed("g_idx") if self.act_order else None
        return (self._packed("qweight"), self._packed("scales"), self._packed("qzeros"), g_idx), dict(
            group_size=self.group_size, zero_offset=self.zero_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" and self.backend == "auto":
            _warn_cpu_once(x.device)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        tensors, kwargs = self._kernel_args()
        y = gptq_matmul(x, *tensors, **kwargs, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The full-precision weight ``[out, in]`` (Triton on CUDA, plain torch elsewhere); for fused LoRA kernels."""
        tensors, kwargs = self._kernel_args()
        if self.qweight.device.type == "cuda":
            return dequantize(*tensors, **kwargs, dtype=dtype)
        return dequantize_torch(*tensors, **kwargs, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=4, group_size={self.group_size}, act_order={self.act_order}, backend={self.backend}")
