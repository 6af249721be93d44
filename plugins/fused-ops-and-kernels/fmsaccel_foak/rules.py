"""Which replacement each kernel makes, per architecture: a plain table keyed by ``config.model_type``.

For every kernel an architecture supports, the entry names the classes of its
transformers modeling module whose instances get a replacement forward (see
:mod:`fmsaccel_foak.modules`), or the module-level function that is replaced:

- ``fast_rms_layernorm``: ``norms`` (RMSNorm classes; ``gemma: True`` for ``1 + weight`` norms);
- ``fast_rope_embeddings``: ``function`` (the modeling module's ``apply_rotary_pos_emb``);
- ``fast_swiglu``: ``mlp`` (gated MLPs with gate/up/down projections and a SiLU ``act_fn``) or
  ``experts`` (MoE experts whose ``_apply_gate`` gets the packed SwiGLU);
- ``fused_lora``: ``attention`` (q/k/v/o projections) and ``mlp`` (gate/up/down); the attention
  forward is written out per family (:func:`fmsaccel_foak.modules.fused_attention_forward`), with
  ``sliding_window`` (``config`` or ``module``: where the window is kept, for architectures that pass
  one to the attention function) and ``head_norms`` (Qwen3's per-head q/k norms);
- ``fast_loss``: ``causal_lm`` (the causal-LM class), ``logits_divided_by`` (config attribute the
  logits are divided by, Granite), ``moe_aux_loss`` (add the router load-balancing loss).

An architecture or kernel missing here is an error naming what is supported, never a silent no-op.
"""

from __future__ import annotations

from typing import Any


def _dense(prefix: str, model_type: str, attention: dict[str, Any] | None = None, **loss: Any) -> dict[str, Any]:
    """The rules of a Llama-like decoder (RMSNorm, rotary attention, gated SiLU MLP)."""
    return {
        "module": f"transformers.models.{model_type}.modeling_{model_type}",
        "fast_rms_layernorm": {"norms": (f"{prefix}RMSNorm",)},
        "fast_rope_embeddings": {"function": "apply_rotary_pos_emb"},
        "fast_swiglu": {"mlp": (f"{prefix}MLP",)},
        "fused_lora": {"attention": (f"{prefix}Attention",), "mlp": (f"{prefix}MLP",), **(attention or {})},
        "fast_loss": {"causal_lm": (f"{prefix}ForCausalLM",), **loss},
    }


def _moe(prefix: str, model_type: str, attention: dict[str, Any] | None = None, **loss: Any) -> dict[str, Any]:
    """A Mixtral-like decoder: dense attention and norms, experts with packed gate/up weights."""
    return {
        "module": f"transformers.models.{model_type}.modeling_{model_type}",
        "fast_rms_layernorm": {"norms": (f"{prefix}RMSNorm",)},
        "fast_rope_embeddings": {"function": "apply_rotary_pos_emb"},
        "fast_swiglu": {"experts": (f"{prefix}Experts",)},
        "fused_lora": {"attention": (f"{prefix}Attention",), **(attention or {})},
        "fast_loss": {"causal_lm": (f"{prefix}ForCausalLM",), "moe_aux_loss": True, **loss},
    }


RULES: dict[str, dict[str, Any]] = {
    "llama": _dense("Llama", "llama"),
    "mistral": _dense("Mistral", "mistral", {"sliding_window": "config"}),
    "qwen2": _dense("Qwen2", "qwen2", {"sliding_window": "module"}),
    # Qwen3RMSNorm also covers the per-head q_norm / k_norm
    "qwen3": _dense("Qwen3", "qwen3", {"sliding_window": "module", "head_norms": True}),
    "granite": _dense("Granite", "granite", logits_divided_by="logits_scaling"),
    "mixtral": _moe("Mixtral", "mixtral", {"sliding_window": "config"}),
    "granitemoe": _moe("GraniteMoe", "granitemoe", logits_divided_by="logits_scaling"),
}

KERNELS = ("fast_rms_layernorm", "fast_rope_embeddings", "fast_swiglu", "fused_lora", "fast_loss")


def supported(kernel: str) -> list[str]:
    """Architectures with a rule for ``kernel``."""
    return sorted(arch for arch, rules in RULES.items() if kernel in rules)
