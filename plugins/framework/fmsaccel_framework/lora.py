"""Applying LoRA for plugins that do it themselves (quantised loaders, fused LoRA).

One place so every such plugin gets the same two things: LoRA on MoE experts goes
through the MoE plugin's PEFT parameter targeting, and PEFT's own errors (a
misspelled ``target_modules``, an unsupported module) reach the user as one line.
"""

from __future__ import annotations

from .plugin import PluginError


def apply_lora(model, peft_config):
    from peft import get_peft_model

    from fmsaccel_moe.lora import peft_config_for  # plain torch; no Triton needed

    try:
        return get_peft_model(model, peft_config_for(model, peft_config))
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError and friends
        raise PluginError(f"LoRA (target_modules {sorted(peft_config.target_modules)}): "
                          f"{str(e).splitlines()[0]}") from None


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
