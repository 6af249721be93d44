"""The ``accelerated-peft-gptq`` plugin: load a 4-bit GPTQ checkpoint on our kernels and add LoRA.

``load_model`` reads a GPTQ checkpoint folder. Handed a full-precision checkpoint instead
(e.g. a built-in shape such as the default ``tiny-llama``), it first quantises it with
round-to-nearest into ``$FMSACCEL_CACHE/gptq/`` (once; later runs reuse it) and says so.
``augment`` freezes the base model, keeps norms, embeddings and the lm_head in the run's
dtype (no fp32 upcast: that would cost an fp32 lm_head matmul every step) and adds LoRA
through PEFT, which wraps each targeted :class:`QuantLinear`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from fmsaccel_framework.lora import apply_lora
from fmsaccel_framework.plugin import AccelerationPlugin, PluginError, TrainContext

from .linear import QuantLinear
from .loader import count_quant_layers, is_quantized_checkpoint, load_quantized

logger = logging.getLogger(__name__)
PATH = "peft.quantization.auto_gptq"
KERNELS = {"triton_v2": "auto"}  # config name -> QuantLinear backend (fused or dequant+cuBLAS by token count)
CACHE_GROUP_SIZE = 128


def _refuse_mixture_of_experts(path: Path) -> None:
    """transformers keeps MoE experts as fused 3-D tensors, not linears: GPTQ-LoRA would quantise only attention."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        raise PluginError(f"{path.name} is a mixture-of-experts model ({config.get('model_type')}, {experts} experts): "
                          "GPTQ-LoRA covers dense models only (transformers keeps the experts as fused 3-D tensors, "
                          "which our GPTQ kernels do not quantise); for 4-bit MoE use accelerated-peft-bnb with the "
                          "MoE recipes' plugin")


def _cache_root() -> Path:
    return Path(os.environ.get("FMSACCEL_CACHE", Path.home() / ".cache" / "fmsaccel"))


def quantized_cache_path(source: Path) -> Path:
    """Where the RTN copy of a full-precision checkpoint lives (keyed by its path and write time)."""
    stamp = f"{source.resolve()}:{(source / 'config.json').stat().st_mtime_ns}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:8]
    return _cache_root() / "gptq" / f"{source.name}-{digest}-g{CACHE_GROUP_SIZE}"


def ensure_quantized(model_name_or_path: str) -> Path:
    """``model_name_or_path`` if it is a quantised checkpoint, else its cached RTN 4-bit copy (made once)."""
    import fcntl
    import shutil

    from .quantize import quantize_model

    source = Path(model_name_or_path).expanduser()
    if is_quantized_checkpoint(source):
        return source
    if not (source / "config.json").exists():
        from fmsaccel_cli import models

        source = models.resolve_model_path(model_name_or_path)
    target = quantized_cache_path(source)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process quantises, the others wait and reuse
        if not (target / ".complete").exists():
            logger.warning("%s is not a GPTQ checkpoint: quantising it to 4-bit with round-to-nearest (group size "
                           "%d) into %s once; run `fmsaccel quantize --method gptq` for a calibrated checkpoint",
                           source, CACHE_GROUP_SIZE, target)
            tmp = target.with_name(target.name + ".tmp")
            quantize_model(str(source), tmp, method="rtn", group_size=CACHE_GROUP_SIZE, overwrite=True,
                           progress=logger.info)
            (tmp / ".complete").write_text(str(source))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target


class GPTQPlugin(AccelerationPlugin):
    def __init__(self, spec, config):
        super().__init__(spec, config)
        self.keys = config[PATH]
        if self.keys["kernel"] not in KERNELS:
            raise PluginError(f"plugins.{PATH}.kernel: unknown kernel '{self.keys['kernel']}' "
                              f"(available: {', '.join(KERNELS)})")
        if self.keys["use_external_lib"]:
            raise PluginError(f"plugins.{PATH}.use_external_lib: true is not supported; fmsaccel ships its own GPTQ "
                              "loader and kernels (AutoGPTQ/GPTQModel publish no wheels for current Python)")

    def load_model(self, model_name_or_path: str, ctx: TrainContext):
        path = Path(model_name_or_path).expanduser()
        _refuse_mixture_of_experts(path)
        if not is_quantized_checkpoint(path):
            if self.keys["from_quantized"]:
                ctx.report.note(self.name, f"{path.name} is not a GPTQ checkpoint: loading its RTN 4-bit copy")
            try:
                path = ensure_quantized(model_name_or_path)
            except ValueError as e:
                raise PluginError(f"cannot make a 4-bit copy of {model_name_or_path}: {e}") from None
        model = load_quantized(path, dtype=ctx.torch_dtype or torch.bfloat16, backend=KERNELS[self.keys["kernel"]],
                               attn_implementation=ctx.extras.get("attn_implementation"))
        ctx.report.add(self.name, f"nn.Linear -> QuantLinear (GPTQ 4-bit, {self.keys['kernel']})",
                       count_quant_layers(model))
        if ctx.fsdp:
            storage = ctx.torch_dtype or torch.bfloat16
            layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
            for layer in layers:
                layer.use_float_storage(storage)
            ctx.report.add(self.name, f"QuantLinear packed tensors held as {str(storage).removeprefix('torch.')} "
                                      "parameters (FSDP shards them)", len(layers))
        if not torch.cuda.is_available():
            ctx.report.note(self.name, "no CUDA: QuantLinear dequantises with plain torch (Triton kernels not used)")
        return model

    def augment(self, model, ctx: TrainContext):
        if ctx.peft_config is None:
            raise PluginError("accelerated-peft-gptq needs peft_method: lora (4-bit GPTQ weights cannot be trained)")
        for param in model.parameters():
            param.requires_grad_(False)
        if ctx.args.get("gradient_checkpointing"):
            model.enable_input_require_grads()  # the frozen embeddings must still pass grads to checkpointed layers
        model = apply_lora(model, ctx.peft_config)
        wrapped = sum(1 for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, QuantLinear))
        if wrapped == 0:
            raise PluginError(f"no GPTQ linear matched target_modules {ctx.peft_config.target_modules}")
        ctx.report.add(self.name, "QuantLinear (GPTQ 4-bit) wrapped by LoRA", wrapped)
        if ctx.sft_config is not None and (ctx.sft_config.bf16 or ctx.sft_config.fp16):
            # PEFT's generic LoRA layer casts its input to the fp32 adapter dtype on every call, and autocast
            # casts it back for the matmul: two copies of each activation per projection (bitsandbytes' LoRA
            # layer skips this under autocast; the H100 profile showed twice the baseline's copy time)
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled") and isinstance(getattr(module, "base_layer", None),
                                                                               QuantLinear):
                    module.cast_input_dtype_enabled = False
            ctx.report.add(self.name, "LoRA input casts to fp32 off (autocast runs the adapters)", wrapped)
        ctx.peft_config = None
        return model

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        # DDP re-broadcasts every buffer each step by default: for GPTQ that is all the 4-bit weights
        handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
        fsdp = bool(getattr(trainer.args, "fsdp", None))
        if trainer.args.world_size > 1 and trainer.args.ddp_broadcast_buffers is None and not fsdp:
            if handler is None:
                raise PluginError("multi-GPU GPTQ: set ddp_broadcast_buffers: false (the 4-bit weights are buffers)")
            handler.broadcast_buffers = False
            ctx.report.note(self.name, "DDP broadcast_buffers off (the frozen 4-bit weights are buffers)")


def build(spec, config) -> GPTQPlugin:
    return GPTQPlugin(spec, config)
