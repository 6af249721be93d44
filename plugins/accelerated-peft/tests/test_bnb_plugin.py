"""The bitsandbytes QLoRA plugin on the CPU: 4-bit load, LoRA by the plugin or (baseline) left to TRL."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

from fmsaccel_framework.plugin import PluginError, TrainContext
from fmsaccel_peft.spec import BNB

PATH = "peft.quantization.bitsandbytes"
KEYS = {"quant_type": "nf4", "no_peft_model": False, "double_quant": True, "compute_dtype": None,
        "quant_storage": None}


def _ctx(**args):
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return TrainContext(args=args, torch_dtype=torch.bfloat16, peft_config=lora)


def test_accelerated_qlora_loads_4bit_and_adds_lora_without_upcasting(tiny_llama_folder):
    import bitsandbytes as bnb

    plugin = BNB.build({PATH: KEYS})
    ctx = _ctx()
    model = plugin.augment(plugin.load_model(str(tiny_llama_folder), ctx), ctx)
    assert isinstance(model, PeftModel) and ctx.peft_config is None
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    assert ctx.report.entries[(BNB.name, "bnb.nn.Linear4bit (nf4) wrapped by LoRA")] == 8
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # no fp32 upcast of frozen weights
    ids = torch.arange(16).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_baseline_leaves_lora_to_the_trainer_and_needs_lora(tiny_llama_folder):
    plugin = BNB.build({PATH: {**KEYS, "no_peft_model": True}})
    ctx = _ctx()
    model = plugin.augment(plugin.load_model(str(tiny_llama_folder), ctx), ctx)
    assert not isinstance(model, PeftModel) and ctx.peft_config is not None
    ctx.peft_config = None
    with pytest.raises(PluginError, match="needs peft_method: lora"):
        plugin.augment(model, ctx)


def test_fsdp_stores_the_4bit_weights_in_the_training_dtype():
    plugin = BNB.build({PATH: KEYS})
    config = plugin.quantization_config(_ctx(distributed={"strategy": "fsdp"}))
    assert config.bnb_4bit_quant_storage == torch.bfloat16
    assert plugin.quantization_config(_ctx()).bnb_4bit_quant_storage == torch.uint8
