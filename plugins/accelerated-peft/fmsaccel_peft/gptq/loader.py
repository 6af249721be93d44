"""Load a 4-bit GPTQ checkpoint without ever materialising full-precision weights.

The model is built with its parameters on the meta device, every ``nn.Linear`` that has a
``qweight`` in the checkpoint is swapped for a :class:`QuantLinear` built straight from the
checkpoint tensors, and the remaining parameters (embeddings, norms, lm_head) are read in
``dtype``. Reads both checkpoint formats (v1 ``gptq``, v2 ``gptq_v2``), sharded or not, with
the settings in ``config.json``'s ``quantization_config`` or in ``quantize_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmsaccel_framework.plugin import PluginError

from .linear import QuantLinear
from .packing import ZERO_OFFSET

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str

    @property
    def zero_offset(self) -> int:
        return ZERO_OFFSET[self.checkpoint_format]


def _raw_quant_config(path: Path) -> dict | None:
    config = path / "config.json"
    if config.exists():
        quant = json.loads(config.read_text()).get("quantization_config")
        if quant:
            return quant
    legacy = path / "quantize_config.json"  # AutoGPTQ / GPTQModel write this beside config.json
    return json.loads(legacy.read_text()) if legacy.exists() else None


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with any quantisation settings (GPTQ or not)."""
    path = Path(path)
    return path.is_dir() and _raw_quant_config(path) is not None


def read_quant_config(path: str | os.PathLike) -> GPTQConfig:
    """The checkpoint's GPTQ settings, or a :class:`PluginError` saying why it cannot be loaded."""
    path = Path(path)
    raw = _raw_quant_config(path)
    if raw is None:
        raise PluginError(f"{path} is not a GPTQ checkpoint: no quantization_config in config.json and no "
                          "quantize_config.json")
    method = str(raw.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise PluginError(f"{path} is quantised with '{method}', not GPTQ")
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    if raw.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in ZERO_OFFSET:
        raise PluginError(f"{path}: GPTQ checkpoint format '{fmt}' is not supported "
                          f"(we load: {', '.join(ZERO_OFFSET)})")
    bits = raw.get("bits")
    if bits != 4:
        raise PluginError(f"{path}: {bits}-bit GPTQ is not supported (only 4-bit)")
    group_size = int(raw.get("group_size", -1))
    if group_size != -1 and group_size <= 0:
        raise PluginError(f"{path}: invalid group_size {group_size} (a positive number or -1)")
    return GPTQConfig(bits=4, group_size=group_size, desc_act=bool(raw.get("desc_act", False)),
                      sym=bool(raw.get("sym", True)), checkpoint_format=fmt)


class CheckpointTensors:
    """Lazy access to the tensors of a (sharded) safetensors checkpoint, by name."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        from safetensors import safe_open

        self._open = safe_open
        self.device = str(device)
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / file for name, file in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
                hint = f" (found {', '.join(found)}; convert them to safetensors)" if found else ""
                raise PluginError(f"{path}: no *.safetensors weights{hint}")
            for shard in shards:
                for name in self._handle(shard).keys():
                    self.files[name] = shard

    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.exists():
                raise PluginError(f"checkpoint shard {file} is listed in the index but missing")
            self._handles[file] = self._open(str(file), framework="pt", device=self.device)
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def empty_model(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The model of ``config`` with parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()  # meta parameters are not tied on creation; tied ones then list (and load) once
    return model


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted) of ``root`` with ``tensor`` (parameters stay frozen)."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _quant_layer(prefix: str, target: nn.Module, tensors: CheckpointTensors, quant: GPTQConfig, dtype, backend):
    if not isinstance(target, nn.Linear):
        kind = "nothing" if target is None else type(target).__name__
        raise PluginError(f"the checkpoint has quantised tensors for '{prefix}', but the model has {kind} there "
                          "(not an nn.Linear; this transformers version may lay the model out differently)")
    wanted = ["qweight", "qzeros", "scales"] + (["g_idx"] if quant.desc_act else [])
    missing = [f"{prefix}.{t}" for t in wanted if f"{prefix}.{t}" not in tensors]
    if target.bias is not None and f"{prefix}.bias" not in tensors:
        missing.append(f"{prefix}.bias")
    if missing:
        raise PluginError(f"GPTQ checkpoint is missing tensors: {', '.join(missing)}")
    get = lambda t: tensors.get(f"{prefix}.{t}") if f"{prefix}.{t}" in tensors else None
    bias = get("bias")
    try:
        layer = QuantLinear(get("qweight"), get("qzeros"), get("scales"), get("g_idx"),
                            None if bias is None else bias.to(dtype),
                            group_size=quant.group_size, zero_offset=quant.zero_offset, backend=backend)
    except ValueError as err:
        raise PluginError(f"GPTQ tensors of '{prefix}' do not fit together: {err}") from None
    if (layer.in_features, layer.out_features) != (target.in_features, target.out_features):
        raise PluginError(f"'{prefix}' is {target.in_features}->{target.out_features} in the model config but "
                          f"{layer.in_features}->{layer.out_features} in the checkpoint")
    return layer


def load_quantized(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Build a causal LM from a 4-bit GPTQ checkpoint folder, quantised linears as :class:`QuantLinear`."""
    from transformers import AutoConfig

    path = Path(path)
    quant = read_quant_config(path)
    device = torch.device(device) if device is not None else default_device()
    tensors = CheckpointTensors(path, device)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we do the quantised layers ourselves; transformers must not try
    model = empty_model(config, dtype, attn_implementation)

    prefixes = sorted({n.removesuffix(".qweight") for n in tensors.names() if n.endswith(".qweight")})
    if not prefixes:
        raise PluginError(f"{path}: quantization_config says GPTQ but no tensor is named *.qweight")
    modules = dict(model.named_modules())
    for prefix in prefixes:
        layer = _quant_layer(prefix, modules.get(prefix), tensors, quant, dtype, backend)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)

    for name, param in list(model.named_parameters()):
        if param.device.type == "meta" and name in tensors:
            tensor = tensors.get(name)
            set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    for name, buffer in list(model.named_buffers()):
        if name in tensors and not isinstance(model.get_submodule(name.rpartition(".")[0]), QuantLinear):
            set_tensor(model, name, tensors.get(name).to(buffer.dtype))
    model.tie_weights()  # e.g. an lm_head tied to the embeddings is not stored
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PluginError(f"{path}: checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    model.to(device)  # the buffers that were built on the CPU (rotary tables)
    model.gptq_config = quant
    logger.info("loaded %d GPTQ linear layers (group_size %s, %s) from %s", len(prefixes), quant.group_size,
                quant.checkpoint_format, path)
    return model.eval()


def count_quant_layers(model: nn.Module) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())

