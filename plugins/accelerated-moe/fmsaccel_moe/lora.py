"""LoRA on the routed experts, stored the way PEFT stores it.

PEFT (``LoraConfig(target_parameters=["experts.gate_up_proj", ...])``) wraps an
experts module in one ``ParamWrapper`` per targeted 3-D parameter, holding
``lora_A: [r*E, in]`` and ``lora_B: [out, r*E]``. Its own forward folds
``W + B @ A`` for every expert into a dense weight on each call. Ours reads the same
factors as ``A: [E, r, in]`` and ``B: [E, out, r]`` and adds the low-rank rows inside
the grouped computation instead (``ops._lora_rows``), so the adapter trained here is
an ordinary PEFT adapter: ``PeftModel.from_pretrained`` loads it and
``merge_and_unload`` merges it.
"""

from __future__ import annotations

import copy

import torch

from fmsaccel_framework.plugin import PluginError

from .ops import ExpertLoRA
from .rules import RULES, MoERule

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def wants_expert_lora(peft_config, rule: MoERule) -> bool:
    """True when the LoRA config names the experts (``target_modules: [..., experts]``) or their parameters."""
    modules = peft_config.target_modules
    modules = [modules] if isinstance(modules, str) else list(modules or [])
    params = list(getattr(peft_config, "target_parameters", None) or [])
    return rule.experts in modules or any(p.rpartition(".")[2] in EXPERT_PARAMETERS for p in params)


def expert_lora_config(peft_config, rule: MoERule):
    """``peft_config`` with ``experts`` moved from ``target_modules`` to ``target_parameters``.

    PEFT cannot wrap an experts *module* (it is not a Linear); it wraps its 3-D
    parameters. PEFT's parameter LoRA has no dropout, so a config that asks for it is
    refused rather than silently changed.
    """
    if getattr(peft_config, "lora_dropout", 0.0):
        raise PluginError(
            f"accelerated-moe: LoRA on experts needs lora_dropout=0 (got {peft_config.lora_dropout}); "
            "PEFT's expert-parameter LoRA cannot apply dropout"
        )
    config = copy.deepcopy(peft_config)
    modules = config.target_modules
    if isinstance(modules, str):
        if modules == rule.experts:
            modules = []
        else:
            raise PluginError(
                f"accelerated-moe: target_modules={modules!r} is a pattern; list module names to add experts"
            )
    else:
        modules = [m for m in (modules or []) if m != rule.experts]
    config.target_modules = modules
    params = list(getattr(config, "target_parameters", None) or [])
    for name in EXPERT_PARAMETERS:
        key = f"{rule.experts}.{name}"
        if key not in params:
            params.append(key)
    config.target_parameters = params
    return config


def peft_config_for(model, peft_config):
    """The LoRA config to hand to ``get_peft_model`` for ``model``: experts moved to ``target_parameters``
    on a supported MoE model, else unchanged. For loader plugins that apply PEFT before this plugin
    runs (bitsandbytes / GPTQ QLoRA on an MoE model)."""
    rule = RULES.get(getattr(getattr(model, "config", None), "model_type", None))
    if peft_config is None or rule is None or not wants_expert_lora(peft_config, rule):
        return peft_config
    return expert_lora_config(peft_config, rule)


def expert_lora_factors(head: torch.nn.Module) -> dict[str, ExpertLoRA]:
    """The active LoRA factors of each PEFT ``ParamWrapper`` around an experts module."""
    factors: dict[str, ExpertLoRA] = {}
    module = head
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        lora = _factors(module)
        if lora is not None:
            factors[module.parameter_name] = lora
        module = module.base_layer
    return factors


def _factors(wrapper) -> ExpertLoRA | None:
    if wrapper.disable_adapters or wrapper.merged:
        return None  # adapters off, or already folded into the base weight
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise PluginError(f"accelerated-moe: {len(active)} active LoRA adapters on experts; only one is supported")
    name = active[0]
    if not getattr(wrapper, "_did_swap_in_out_features", False):
        raise PluginError("accelerated-moe: expert LoRA on an [E, in, out] parameter layout is not supported")
    experts = wrapper.num_experts
    a = wrapper.lora_A[name].weight  # [r*E, in]
    b = wrapper.lora_B[name].weight  # [out, r*E]
    return ExpertLoRA(
        a=a.reshape(experts, -1, a.shape[-1]),
        b=b.reshape(b.shape[0], -1, experts).permute(2, 0, 1),
        scale=float(wrapper.scaling[name]),
    )
