"""GPTQ-LoRA end to end on the CPU: quantise -> load (plugin) -> LoRA -> train -> save adapter -> reload."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel

from fmsaccel_framework.plugin import PluginError, TrainContext
from fmsaccel_peft.gptq import QuantLinear, load_quantized, plugin
from fmsaccel_peft.gptq.quantize import quantize_model
from fmsaccel_peft.spec import GPTQ

KEYS = {"kernel": "triton_v2", "from_quantized": True, "use_external_lib": False}


def _plugin(**keys):
    return GPTQ.build({plugin.PATH: {**KEYS, **keys}})


def _context(**args) -> TrainContext:
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return TrainContext(args=args, torch_dtype=torch.bfloat16, peft_config=lora)


@pytest.fixture(scope="module")
def full_precision(tiny_llama_folder):
    return tiny_llama_folder


def test_quantize_load_train_save_reload(full_precision, tmp_path):
    quantized = quantize_model(str(full_precision), tmp_path / "gptq", method="gptq", group_size=32, act_order=True,
                               calib_samples=8, seq_len=64, progress=lambda m: None)
    gptq = _plugin()
    ctx = _context(gradient_checkpointing=True)
    model = gptq.augment(gptq.load_model(str(quantized), ctx), ctx)

    assert ctx.peft_config is None and isinstance(model, PeftModel)
    assert ctx.report.entries[(GPTQ.name, "QuantLinear (GPTQ 4-bit) wrapped by LoRA")] == 14
    assert ctx.report.entries[(GPTQ.name, "nn.Linear -> QuantLinear (GPTQ 4-bit, triton_v2)")] == 14
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # no fp32 upcast of frozen weights

    model.gradient_checkpointing_enable()
    model.train()
    ids = (torch.arange(32) + torch.tensor([[0], [50], [100], [150]])) % 256  # learnable: next token = this + 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, losses  # as fast as LoRA on the full-precision tiny model

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    base = load_quantized(quantized, dtype=torch.bfloat16, device="cpu")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert isinstance(reloaded.base_model.model.model.layers[0].mlp.down_proj.base_layer, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)


def test_full_precision_checkpoint_is_quantized_once_into_the_cache(full_precision, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FMSACCEL_CACHE", str(tmp_path))
    ctx = _context()
    with caplog.at_level(logging.WARNING, logger=plugin.__name__):
        model = _plugin().load_model(str(full_precision), ctx)
    assert sum("is not a GPTQ checkpoint: quantising it" in r.message for r in caplog.records) == 1
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    cached = plugin.quantized_cache_path(full_precision)
    assert cached.parent == tmp_path / "gptq" and (cached / ".complete").exists()
    assert any("RTN 4-bit copy" in note for _, note in ctx.report.notes)

    caplog.clear()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger=plugin.__name__):
        _plugin().load_model(str(full_precision), _context())
    assert not caplog.records and (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_plugin_errors_are_clear(full_precision):
    with pytest.raises(PluginError, match=r"unknown kernel 'exllama' \(available: triton_v2\)"):
        _plugin(kernel="exllama")
    with pytest.raises(PluginError, match="use_external_lib: true is not supported"):
        _plugin(use_external_lib=True)
    ctx = _context()
    ctx.peft_config = None
    with pytest.raises(PluginError, match="needs peft_method: lora"):
        _plugin().augment(torch.nn.Linear(2, 2), ctx)


@pytest.mark.parametrize("shape", ["tiny-mixtral", "tiny-granitemoe"])
def test_mixture_of_experts_models_are_refused_before_any_quantisation(shape, tmp_path, monkeypatch):
    from fmsaccel_cli import models

    monkeypatch.setenv("FMSACCEL_CACHE", str(tmp_path))
    with pytest.raises(PluginError, match=r"mixture-of-experts model .*GPTQ-LoRA covers dense models only"):
        _plugin().load_model(str(models.materialize(shape)), _context())
    assert not (tmp_path / "gptq").exists()


def test_lora_inputs_stay_in_the_compute_dtype_under_mixed_precision(full_precision, tmp_path):
    """Under bf16 autocast PEFT would cast every LoRA input to fp32 and autocast back: the plugin turns that off."""
    from types import SimpleNamespace

    quantized = quantize_model(str(full_precision), tmp_path / "rtn", method="rtn", group_size=32,
                               progress=lambda m: None)
    gptq = _plugin()
    ctx = _context()
    ctx.sft_config = SimpleNamespace(bf16=True, fp16=False)
    model = gptq.augment(gptq.load_model(str(quantized), ctx), ctx)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), QuantLinear)]
    assert len(lora_layers) == 14 and not any(m.cast_input_dtype_enabled for m in lora_layers)
    ids = torch.arange(16).reshape(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)

    ctx = _context()
    ctx.sft_config = SimpleNamespace(bf16=False, fp16=False)  # fp32 training: PEFT's casting stays on
    model = gptq.augment(gptq.load_model(str(quantized), ctx), ctx)
    assert all(m.cast_input_dtype_enabled for m in model.modules()
               if isinstance(getattr(m, "base_layer", None), QuantLinear))
