"""QLoRA through bitsandbytes 4-bit (nf4/fp4).

``no_peft_model: true`` is the baseline: load 4-bit and let TRL do PEFT its own
way (``prepare_model_for_kbit_training`` upcasts every non-quantised weight to
fp32), exactly as users run it today. Otherwise the plugin prepares the model
itself: it freezes the base, keeps norms, embeddings and the lm_head in the
compute dtype (no fp32 upcast: that costs a full fp32 lm_head matmul and fp32
logits every step) and adds LoRA through PEFT.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fmsaccel_framework.lora import apply_lora
from fmsaccel_framework.plugin import AccelerationPlugin, PluginError, TrainContext

PATH = "peft.quantization.bitsandbytes"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in _DTYPES:
        raise PluginError(f"plugins.{PATH}: dtype '{name}' is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class BitsAndBytesPlugin(AccelerationPlugin):
    def __init__(self, spec, config):
        super().__init__(spec, config)
        self.keys = config[PATH]

    def quantization_config(self, ctx: TrainContext) -> BitsAndBytesConfig:
        compute = _dtype(self.keys["compute_dtype"], ctx.torch_dtype)
        storage = _dtype(self.keys["quant_storage"], torch.uint8) if self.keys["quant_storage"] else None
        if ctx.fsdp and storage is None:
            storage = ctx.torch_dtype  # FSDP shards float tensors only
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type=self.keys["quant_type"],
                      bnb_4bit_use_double_quant=self.keys["double_quant"], bnb_4bit_compute_dtype=compute)
        if storage is not None:
            kwargs["bnb_4bit_quant_storage"] = storage
        return BitsAndBytesConfig(**kwargs)

    def load_model(self, model_name_or_path: str, ctx: TrainContext):
        device_map = None
        if torch.cuda.is_available():
            device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        return AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            quantization_config=self.quantization_config(ctx),
            dtype=ctx.torch_dtype,
            device_map=device_map,
            attn_implementation=ctx.extras.get("attn_implementation", "sdpa"),
        )

    def augment(self, model, ctx: TrainContext):
        if self.keys["no_peft_model"] or ctx.peft_config is None:
            if ctx.peft_config is None:
                raise PluginError("accelerated-peft-bnb needs peft_method: lora (4-bit weights cannot be trained)")
            ctx.report.note(self.name, "no_peft_model: LoRA and k-bit preparation left to TRL (baseline)")
            return model
        for param in model.parameters():
            param.requires_grad_(False)
        if ctx.args.get("gradient_checkpointing"):
            model.enable_input_require_grads()
        model = apply_lora(model, ctx.peft_config)
        import bitsandbytes as bnb

        wrapped = sum(1 for m in model.modules()
                      if hasattr(m, "lora_A") and isinstance(m.base_layer, bnb.nn.Linear4bit))
        if wrapped == 0:
            raise PluginError(f"no 4-bit linear matched target_modules {ctx.peft_config.target_modules}")
        ctx.report.add(self.name, f"bnb.nn.Linear4bit ({self.keys['quant_type']}) wrapped by LoRA", wrapped)
        ctx.peft_config = None
        return model


def build(spec, config) -> BitsAndBytesPlugin:
    return BitsAndBytesPlugin(spec, config)
