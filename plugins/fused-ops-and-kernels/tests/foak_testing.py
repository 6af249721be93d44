"""Helpers shared by the foak tests: tiny models per architecture and quantised base layers."""

from __future__ import annotations

import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 128


def tiny_config(model_type: str, **overrides):
    """A 2-layer random config of ``model_type`` (head_dim 16, GQA 4/2), small enough for the interpreter."""
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    if model_type in ("mixtral", "granitemoe"):
        common.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
    if model_type in ("granite", "granitemoe"):
        common.update(logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2)
    if model_type == "qwen2":
        common.update(use_sliding_window=False)
    config = AutoConfig.for_model(model_type, **{**common, **overrides})
    config._attn_implementation = "sdpa"
    return config


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # norms start at 1; randomise them so a wrong weight gradient or offset shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(DEVICE, dtype)


def to_bnb_nf4(linear: nn.Linear) -> nn.Module:
    """The same layer as a frozen bitsandbytes nf4 ``Linear4bit`` (fp32 compute)."""
    import bitsandbytes as bnb

    quant = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    quant.weight = bnb.nn.Params4bit(linear.weight.data.detach().cpu().clone(), requires_grad=False,
                                     quant_type="nf4")
    if linear.bias is not None:
        quant.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    return quant.to(DEVICE)


def to_gptq(linear: nn.Linear, group_size: int = 32) -> nn.Module:
    """The same layer as a frozen 4-bit GPTQ ``QuantLinear`` (round-to-nearest)."""
    from fmsaccel_peft.gptq.linear import QuantLinear
    from fmsaccel_peft.gptq.packing import pack
    from fmsaccel_peft.gptq.quantize import rtn_quantize

    q = rtn_quantize(linear.weight.data.detach().float().cpu(), group_size=group_size)
    t = pack(q.intweight, q.zeros, q.scales, q.g_idx)
    bias = None if linear.bias is None else linear.bias.data.detach().clone().cpu()
    layer = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, group_size=group_size)
    return layer.to(DEVICE)


QUANTIZE = {"bitsandbytes": to_bnb_nf4, "auto_gptq": to_gptq, None: None}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_decoder(model: nn.Module, base_layer: str | None) -> nn.Module:
    """Replace the decoder's linears by ``base_layer`` 4-bit layers (in place); freeze everything."""
    for p in model.parameters():
        p.requires_grad_(False)
    convert = QUANTIZE[base_layer]
    if convert is None:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in DECODER_LINEARS and type(child) is nn.Linear:
                setattr(parent, name, convert(child))
    return model


def build_plugin(path: str = "training.fused_ops_and_kernels", **keys):
    """The foak plugin configured under ``path`` with ``keys`` over the spec's defaults."""
    from fmsaccel_foak.spec import FOAK

    values = {k: v.default for k, v in FOAK.paths[path].items()}
    values.update(keys)
    return FOAK.build({path: values})


FOAK_KERNELS = dict(fused_lora=True, fast_rms_layernorm=True, fast_rope_embeddings=True, fast_swiglu=True,
                    fast_loss="fused_ce_liger")


def padding_free_lora_model(base_layer: str | None = None, checkpointing: bool = True, layers: int = 2,
                            dtype=torch.float32, shape: dict | None = None, **keys):
    """Tiny Llama, LoRA (dropout 0.1) on q/k/v/o, every foak kernel plus ``keys``, padding-free attention.

    Returns the PEFT model, after the plugin's ``augment`` and ``prepare_trainer``, and the run's context.
    """
    from peft import LoraConfig, get_peft_model

    from fmsaccel_aadp.attention import register_attention
    from fmsaccel_framework.plugin import TrainContext

    model = quantize_decoder(tiny_model("llama", num_hidden_layers=layers, dtype=dtype, **(shape or {})), base_layer)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ctx = TrainContext(args={"gradient_checkpointing": checkpointing})
    plugin = build_plugin("peft.quantization.fused_ops_and_kernels", base_layer=base_layer,
                          **{**FOAK_KERNELS, **keys})
    model = plugin.augment(model, ctx)
    model.base_model.model.set_attn_implementation(register_attention("sdpa_masked"))
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
    return model, ctx


def train_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward in training mode: the loss and every parameter gradient."""
    model.train()
    model.zero_grad()
    torch.manual_seed(3)  # LoRA dropout masks
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class KernelMaskDropout(nn.Dropout):
    """PEFT's LoRA dropout with the masks foak's ``dropout_in_kernel`` draws: one seed per call from the same
    generator, in the same order, expanded by ``lora_dropout.keep_mask``."""

    def forward(self, x):
        from fmsaccel_foak.ops import lora_dropout

        x2 = x.reshape(-1, x.shape[-1])
        mask = lora_dropout.keep_mask(lora_dropout.draw_seed(x.device), tuple(x2.shape), self.p, x.dtype, x.device)
        return x * mask.view_as(x) / (1.0 - self.p)


def use_kernel_masks(model: nn.Module) -> None:
    """Swap every PEFT LoRA dropout of ``model`` for :class:`KernelMaskDropout`."""
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            for name, dropout in module.lora_dropout.items():
                if isinstance(dropout, nn.Dropout) and dropout.p:
                    module.lora_dropout[name] = KernelMaskDropout(dropout.p)
