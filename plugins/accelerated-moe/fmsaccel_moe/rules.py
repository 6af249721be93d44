"""Which modules of each supported architecture hold the routed experts.

One rule per ``model_type``. Only the experts module's forward is replaced: the
router, the shared experts and the block's own forward stay Hugging Face's code, so
routing (softmax / top-k order, renormalisation), router logits (recorded for the
auxiliary load-balancing loss) and shared-expert gating are exactly the
architecture's. Parameter names and shapes are untouched, so ``save_pretrained``
writes the original checkpoint layout.

Modules are found by class name and attribute and checked for the expected fused
layout (``gate_up_proj: [E, 2I, H]``, ``down_proj: [E, H, I]``, SiLU, no biases);
anything else is a clear error rather than a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmsaccel_framework.plugin import PluginError


@dataclass(frozen=True)
class MoERule:
    blocks: tuple[str, ...]  # sparse-MoE block class names
    router: str  # the block's router attribute (kept)
    routing: str  # how that router weighs experts (for the report and README)
    experts: str = "experts"  # the block's experts attribute (patched)
    shared: str | None = None  # where shared experts live (kept dense)


_SOFTMAX_TOPK = "softmax over experts (fp32), top-k"
_TOPK_SOFTMAX = "top-k of the logits, softmax over the k"

RULES: dict[str, MoERule] = {
    "mixtral": MoERule(("MixtralSparseMoeBlock",), "gate", f"{_SOFTMAX_TOPK}, renormalised"),
    "granitemoe": MoERule(("GraniteMoeMoE",), "router", _TOPK_SOFTMAX),
    "granitemoeshared": MoERule(
        ("GraniteMoeSharedMoE",), "router", _TOPK_SOFTMAX, shared="decoder layer shared_mlp, added to the MoE output"
    ),
    "granitemoehybrid": MoERule(
        ("GraniteMoeHybridMoE",), "router", _TOPK_SOFTMAX, shared="decoder layer shared_mlp, added to the MoE output"
    ),
    "qwen2_moe": MoERule(
        ("Qwen2MoeSparseMoeBlock",),
        "gate",
        f"{_SOFTMAX_TOPK}, renormalised when norm_topk_prob",
        shared="block shared_expert scaled by sigmoid(shared_expert_gate)",
    ),
    "qwen3_moe": MoERule(("Qwen3MoeSparseMoeBlock",), "gate", f"{_SOFTMAX_TOPK}, renormalised when norm_topk_prob"),
}


@dataclass
class MoESite:
    """One MoE block of a model: where its experts module sits."""

    name: str  # qualified name of the block
    block: torch.nn.Module
    rule: MoERule

    @property
    def head(self) -> torch.nn.Module:
        """What the block calls: the experts module, or PEFT wrappers around it."""
        return getattr(self.block, self.rule.experts)

    @property
    def experts(self) -> torch.nn.Module:
        return unwrap(self.head)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The experts module under any PEFT ``ParamWrapper`` chain (LoRA on expert parameters)."""
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def model_type_of(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise PluginError("accelerated-moe: the model has no config.model_type to look up an MoE rule")
    return model_type


def find_moe_sites(model) -> list[MoESite]:
    """Every MoE block of ``model``, validated; a clear error when the structure is unexpected."""
    model_type = model_type_of(model)
    rule = RULES.get(model_type)
    if rule is None:
        raise PluginError(
            f"accelerated-moe: no rule for model_type {model_type!r}; supported: {', '.join(sorted(RULES))}"
        )
    sites = [MoESite(name, m, rule) for name, m in model.named_modules() if type(m).__name__ in rule.blocks]
    if not sites:
        raise PluginError(
            f"accelerated-moe: {model_type} model has no {'/'.join(rule.blocks)} block; "
            "this transformers version structures it differently"
        )
    for site in sites:
        _validate(site, model.config)
    return sites


def _validate(site: MoESite, config) -> None:
    where = f"accelerated-moe: {site.name} ({type(site.block).__name__})"
    if not hasattr(site.block, site.rule.router):
        raise PluginError(f"{where} has no router attribute {site.rule.router!r}")
    if not hasattr(site.block, site.rule.experts):
        raise PluginError(f"{where} has no experts attribute {site.rule.experts!r}")
    experts = site.experts
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(w, torch.Tensor) or hasattr(w, "dequantize") for w in (gate_up, down)):
        raise PluginError(f"{where}: experts have no fused gate_up_proj/down_proj parameters (transformers < 5?)")
    if gate_up.dim() != 3 or down.dim() != 3:
        raise PluginError(f"{where}: expected 3-D expert weights, got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    e, two_i, h = tuple(gate_up.shape)
    if tuple(down.shape) != (e, h, two_i // 2) or two_i % 2:
        raise PluginError(f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} disagree")
    for flag, bad in (("is_transposed", True), ("has_bias", True), ("has_gate", False)):
        if getattr(experts, flag, not bad) == bad:
            raise PluginError(f"{where}: experts with {flag}={bad} are not supported")
    if getattr(experts, "is_concatenated", True) is False:
        raise PluginError(f"{where}: interleaved gate/up layout is not supported")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise PluginError(f"{where}: the kernels fuse SwiGLU; hidden_act={act!r} is not supported")
