"""Quantise a causal LM to 4-bit GPTQ (or round-to-nearest) in the standard checkpoint layout.

One decoder layer at a time: the layer is materialised on the device (read from the source
checkpoint, or randomly initialised for a built-in shape name), its linears are quantised,
their packed tensors go to the output shards and the layer is dropped again, so a model
never needs its full-precision weights on the device at once.

GPTQ (Frantar et al., 2022) quantises a linear layer column by column and spreads each
column's rounding error over the columns not yet quantised, weighted by the inverse
Hessian ``H = 2 X^T X`` of the layer's calibration inputs ``X``. Here: Hessians come from
forward hooks on the layer's linears (the inputs the *quantised* earlier layers produce),
dead inputs are zeroed, ``damp_percent`` of the mean diagonal is added before the Cholesky
factorisation, and updates are applied lazily a block of columns at a time. Act-order
(``desc_act``) visits the columns by decreasing Hessian diagonal and records the groups in
``g_idx``. All linears of a layer see the inputs the previous (quantised) layers produce;
within a layer they are quantised from one forward pass (no ``true_sequential``). The
decoder layers' keyword inputs (position embeddings, mask) are captured once at layer 0
and reused for every layer.

RTN rounds every group to the nearest grid point and needs no calibration data.

The output is a v1 (``checkpoint_format: gptq``) checkpoint that transformers/optimum,
AutoGPTQ, GPTQModel and :func:`.loader.load_quantized` read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .loader import CheckpointTensors, empty_model, is_quantized_checkpoint, set_tensor
from .packing import MAXQ, pack

METHODS = ("gptq", "rtn")
GROUP_SIZES = (32, 64, 128, -1)
SHARD_BYTES = 4 * 2**30


class QuantizedWeight(NamedTuple):
    """A quantised ``[out, in]`` weight before packing (see :mod:`.packing`)."""

    intweight: torch.Tensor  # [out, in] in [0, 15]
    zeros: torch.Tensor  # [groups, out]
    scales: torch.Tensor  # [groups, out], already rounded to fp16
    g_idx: torch.Tensor  # [in]

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.intweight - self.zeros[g].t()).float() * self.scales[g].t().float()


def _scale_zero(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of a ``[rows, cols]`` slice: (scale, zero point), the range always including 0."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / MAXQ).half().float()  # the checkpoint stores fp16 scales: quantise against those
    if sym:
        zero = torch.full_like(scale, (MAXQ + 1) // 2)
    else:  # v1 checkpoints store zero - 1, so a zero point of 0 is not representable
        zero = torch.round(-lo / scale).clamp(1, MAXQ)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def rtn_quantize(weight: torch.Tensor, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest in groups of ``group_size`` consecutive input columns."""
    w = weight.float()
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    intweight = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, cols, size):
        scale, zero = _scale_zero(w[:, start:start + size], sym)
        intweight[:, start:start + size] = _round(w[:, start:start + size], scale[:, None], zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols, device=w.device, dtype=torch.int32) // size
    return QuantizedWeight(intweight.to(torch.int32), torch.stack(zeros).to(torch.int32), torch.stack(scales), g_idx)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp_percent: float = 0.01,
) -> QuantizedWeight:
    """GPTQ on one ``[out, in]`` weight given the ``[in, in]`` Hessian of its calibration inputs."""
    w = weight.float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(cols, device=h.device) * damp_percent * torch.mean(torch.diag(h))
    # upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    size = cols if group_size == -1 else group_size
    block = size * max(1, 128 // size) if group_size != -1 else 128  # groups never straddle a block
    intweight = torch.empty_like(w)
    scales, zeros = [], []
    if group_size == -1:
        scale, zero = _scale_zero(w, sym)
        scales.append(scale), zeros.append(zero)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb, hb = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        errors = torch.empty_like(wb)
        for i in range(b1 - b0):
            if group_size != -1 and (b0 + i) % size == 0:  # a group starts: its grid from the updated weights
                scale, zero = _scale_zero(wb[:, i:i + size], sym)
                scales.append(scale), zeros.append(zero)
            q = _round(wb[:, i], scale, zero)
            intweight[:, b0 + i] = q
            errors[:, i] = (wb[:, i] - scale * (q - zero)) / hb[i, i]
            wb[:, i:] -= errors[:, i:i + 1] * hb[i, i:].unsqueeze(0)
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]

    inverse = torch.argsort(perm)
    g_idx = (inverse // size).to(torch.int32)  # original column -> group of its position in the visiting order
    return QuantizedWeight(intweight[:, inverse].to(torch.int32), torch.stack(zeros).to(torch.int32),
                           torch.stack(scales), g_idx)


class _Source(NamedTuple):
    config: object
    tensors: CheckpointTensors | None  # None: random weights of a built-in shape
    tokenizer_dir: Path | None
    label: str


def _load_source(name_or_path: str) -> _Source:
    """A full-precision checkpoint folder, or a built-in shape name built with random weights."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        if is_quantized_checkpoint(path):
            raise ValueError(f"{path} is already quantised")
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return _Source(AutoConfig.from_pretrained(path), CheckpointTensors(path), path if has_tokenizer else None,
                       path.name)
    from fmsaccel_cli import models

    if models.is_shape(name_or_path):
        return _Source(models.build_config(name_or_path), None, models.TOKENIZER_DIR, name_or_path)
    raise ValueError(f"'{name_or_path}' is neither a checkpoint folder with a config.json nor a built-in shape "
                     f"({', '.join(models.SHAPES)})")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _materialize(module: nn.Module, prefix: str, source: _Source, dtype, device, seed: int) -> None:
    """Give every meta parameter of ``module`` its real value: from the source, or random for a shape."""
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(source.config, "initializer_range", 0.02)
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            continue
        full = f"{prefix}{name}"
        if source.tensors is not None:
            if full not in source.tensors:
                raise ValueError(f"the source checkpoint has no tensor '{full}'")
            tensor = source.tensors.get(full).to(device=device, dtype=dtype)
        elif name.endswith("bias"):
            tensor = torch.zeros(param.shape, device=device, dtype=dtype)
        elif param.dim() == 1:  # norm weights
            tensor = torch.ones(param.shape, device=device, dtype=dtype)
        else:
            tensor = torch.empty(param.shape, device=device, dtype=dtype).normal_(0, std, generator=generator)
        set_tensor(module, name, tensor)
    for name, buffer in list(module.named_buffers()):
        set_tensor(module, name, buffer.to(device))


def _quantizable(name: str, module: nn.Module) -> bool:
    """Linears we quantise: packable shapes; routers stay full precision (tiny, and precision-critical)."""
    leaf = name.rpartition(".")[2]
    return (isinstance(module, nn.Linear) and module.in_features % 8 == 0 and module.out_features % 8 == 0
            and leaf not in ("gate", "router") and "router" not in leaf)


def _read_texts(file: Path) -> list[str]:
    if file.suffix == ".txt":
        return [file.read_text()]
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.suffix == ".jsonl" \
        else json.loads(file.read_text())
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict):
            texts.append(row["text"] if isinstance(row.get("text"), str) else
                         "\n".join(v for v in row.values() if isinstance(v, str)))
    if not any(texts):
        raise ValueError(f"{file}: no text found (expected strings or objects with a 'text' field)")
    return texts


def _shipped_calibration_data() -> Path | None:
    try:
        from fmsaccel_cli import models
    except ImportError:
        return None
    path = models.ASSETS / "word_tasks.jsonl"
    return path if path.exists() else None


def _calibration_ids(source: _Source, calib_data, samples: int, seq_len: int, seed: int, progress) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: windows of the tokenised calibration file, or random tokens."""
    generator = torch.Generator().manual_seed(seed)
    if calib_data is None:
        calib_data = _shipped_calibration_data() if source.tokenizer_dir is not None else None
        if calib_data is None:
            progress("no calibration data and no tokenizer: calibrating on random tokens (fine for random-weight "
                     "benchmark shapes, poor for real models)")
            return torch.randint(0, source.config.vocab_size, (samples, seq_len), generator=generator)
        progress(f"calibrating on the shipped {calib_data.name}; pass --calib-data for text like your own")
    from transformers import AutoTokenizer

    if source.tokenizer_dir is None:
        raise ValueError("calibration data needs a tokenizer, and the source has none")
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    ids: list[int] = []
    for text in _read_texts(Path(calib_data)):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or 0]
    stream = torch.tensor(ids)
    seq_len = min(seq_len, len(stream))
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, inputs: list, kwargs: dict):
        super().__init__()
        self.inputs, self.kwargs = inputs, kwargs

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ValueError("decoder layers called with extra positional arguments are not supported")
        self.inputs.append(hidden_states)
        self.kwargs.update(kwargs)
        raise _Captured


def _first_layer_inputs(model, layers: nn.ModuleList, ids: torch.Tensor, device) -> tuple[list, dict]:
    inputs, kwargs = [], {}
    first = layers[0]
    layers[0] = _Catcher(inputs, kwargs)
    try:
        for row in ids:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = first
    return inputs, kwargs


def _run_layer(layer: nn.Module, inputs: list, kwargs: dict) -> list:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list, kwargs: dict) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` of each linear's inputs over the calibration samples (running mean)."""
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].reshape(-1, module.in_features).float()
            n, seen = x.shape[0], counts[name]
            hessians[name].mul_(seen / (seen + n)).addmm_(x.t(), x, alpha=2 / (seen + n))
            counts[name] = seen + n
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        _run_layer(layer, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


class _ShardWriter:
    """Collects tensors into safetensors shards of at most ``limit`` bytes, then writes the index."""

    def __init__(self, folder: Path, limit: int | None = None):
        self.folder, self.limit = folder, limit or SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.files = 0, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.limit:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = self.folder / f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(file), metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return
        total = sum(f.stat().st_size for f, _ in self.files)
        weight_map = {}
        for i, (file, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            file.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_tokenizer(source_dir: Path | None, out: Path) -> None:
    if source_dir is None:
        return
    skip = {"config.json", "quantize_config.json", "model.safetensors.index.json", ".complete"}
    for file in source_dir.iterdir():
        if file.is_file() and file.name not in skip and file.suffix not in (".safetensors", ".bin", ".pt", ".lock"):
            shutil.copy(file, out / file.name)


def quantize_model(
    model_name_or_path: str,
    out_dir: str | os.PathLike,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    calib_data: str | os.PathLike | None = None,
    calib_samples: int = 128,
    seq_len: int = 512,
    device: str | torch.device | None = None,
    damp_percent: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Quantise a checkpoint folder or built-in shape name to a 4-bit GPTQ checkpoint in ``out_dir``.

    ``method="rtn"`` needs no calibration data; ``"gptq"`` uses ``calib_samples`` windows of
    ``seq_len`` tokens from ``calib_data`` (.txt, .json or .jsonl with a ``text`` field; by
    default the shipped word-task data, or random tokens when the source has no tokenizer).
    Returns the output folder.
    """
    progress = progress or (lambda message: print(f"[fmsaccel quantize] {message}", flush=True))
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    if bits != 4:
        raise ValueError(f"only 4-bit quantisation is supported, not {bits}-bit")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, not {group_size}")
    if method == "rtn" and act_order:
        raise ValueError("act-order only applies to GPTQ")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; choose another output folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    source = _load_source(model_name_or_path)
    save_dtype = getattr(source.config, "dtype", None) or torch.bfloat16
    save_dtype = getattr(torch, save_dtype) if isinstance(save_dtype, str) else save_dtype
    work_dtype = torch.float32 if device.type == "cpu" else save_dtype  # CPU matmuls are fastest (and exact) in fp32
    model = empty_model(source.config, work_dtype)
    layers_name, layers = _decoder_layers(model)
    prefix = f"{layers_name}."
    outer = [name for name, _ in model.named_parameters() if not name.startswith(prefix)]
    progress(f"{source.label}: {len(layers)} layers, {method.upper()} {bits}-bit, group size {group_size}"
             f"{', act-order' if act_order else ''}, {'sym' if sym else 'asym'}, on {device}")
    for name in outer:
        module_name, _, leaf = name.rpartition(".")
        holder = model.get_submodule(module_name)
        if getattr(holder, leaf).device.type == "meta":
            _materialize(holder, f"{module_name}.", source, work_dtype, device, seed)
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))

    inputs, kwargs = [], {}
    if method == "gptq":
        ids = _calibration_ids(source, calib_data, calib_samples, seq_len, seed, progress)
        with torch.no_grad():
            inputs, kwargs = _first_layer_inputs(model, layers, ids, device)

    writer = _ShardWriter(out)
    for index, layer in enumerate(layers):
        t0 = time.time()
        _materialize(layer, f"{prefix}{index}.", source, work_dtype, device, seed + 1 + index)
        linears = {name: m for name, m in layer.named_modules() if _quantizable(name, m)}
        with torch.no_grad():
            hessians = _hessians(layer, linears, inputs, kwargs) if method == "gptq" else {}
            for name, linear in linears.items():
                if method == "gptq":
                    quantized = gptq_quantize(linear.weight, hessians.pop(name), group_size, sym, act_order,
                                              damp_percent)
                else:
                    quantized = rtn_quantize(linear.weight, group_size, sym)
                for key, tensor in pack(*quantized).items():
                    writer.add(f"{prefix}{index}.{name}.{key}", tensor)
                if method == "gptq":  # the next layer's calibration inputs come from the quantised layer
                    linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
            if method == "gptq":
                inputs = _run_layer(layer, inputs, kwargs)
        quantised_params = {f"{name}.weight" for name in linears}
        for name, param in layer.named_parameters():
            if name not in quantised_params:
                writer.add(f"{prefix}{index}.{name}", param.to(save_dtype))
        layers[index] = layer.to("meta")
        progress(f"layer {index + 1}/{len(layers)}: {len(linears)} linears quantised in {time.time() - t0:.1f}s")

    for name in outer:  # a tied lm_head shares the embedding parameter, so it is not listed (nor stored)
        writer.add(name, model.get_parameter(name).to(save_dtype))
    writer.close()

    quant_config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
                    "damp_percent": damp_percent, "true_sequential": False, "static_groups": False,
                    "checkpoint_format": "gptq", "meta": {"quantizer": "fmsaccel", "method": method}}
    config = source.config
    config.quantization_config = quant_config
    config.dtype = save_dtype
    config.save_pretrained(out)
    (out / "quantize_config.json").write_text(json.dumps(quant_config, indent=2))
    _copy_tokenizer(source.tokenizer_dir, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
    progress(f"wrote {out} ({size:.2f} GiB) in {math.ceil(time.time() - started)}s")
    return out
