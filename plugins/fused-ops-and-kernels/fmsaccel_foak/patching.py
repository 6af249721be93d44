"""Apply one kernel's rule to a model: install the replacement forwards and say what was replaced.

Instance patches (a module's ``forward`` or ``_apply_gate``) live and die with the
model. The RoPE rule replaces a function of a transformers modeling module, which is
process-wide; :func:`undo_function_patches` puts the originals back (tests use it).
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import modules

_FUNCTION_PATCHES: dict[tuple[str, str], Callable] = {}  # (module, name) -> original


class RuleError(ValueError):
    """The rule cannot be applied to this model (the plugin turns it into a PluginError)."""


@dataclass(frozen=True)
class Options:
    keep_weights: bool = False  # reuse dequantised weights in the backward (set under gradient checkpointing)
    fast_swiglu: bool = False  # the fused MLP uses the SwiGLU kernel too
    fast_loss: bool | str = False
    fp8: bool = False  # fused LoRA's frozen base matmuls in FP8 (long sequences, FP8-capable GPUs)
    dropout_in_kernel: bool = False  # fused LoRA's dropout drawn inside Triton kernels, no mask stored

    def lora_op_options(self) -> dict:
        """The fused LoRA op's keyword options (``ops.fused_lora``) these options set."""
        return {"fp8": self.fp8, "dropout_in_kernel": self.dropout_in_kernel}


def _classes(modeling, names) -> tuple[type, ...]:
    found = []
    for name in names:
        cls = getattr(modeling, name, None)
        if cls is None:
            raise RuleError(f"{modeling.__name__} has no class {name} (transformers version mismatch)")
        found.append(cls)
    return tuple(found)


def _instances(model: nn.Module, classes: tuple[type, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, classes)]


def _set_forward(module: nn.Module, forward: Callable, attr: str = "forward") -> None:
    setattr(module, attr, types.MethodType(forward, module))


def _set_fused_forward(module: nn.Module, forward: Callable) -> None:
    """A fused-LoRA forward; ``_foak_keep_weights`` lets the activation budget turn weight keeping off per step."""
    _set_forward(module, forward)
    module._foak_keep_weights = True


def _patch_function(modeling, name: str, replacement: Callable) -> None:
    original = getattr(modeling, name, None)
    if original is None:
        raise RuleError(f"{modeling.__name__} has no function {name} (transformers version mismatch)")
    key = (modeling.__name__, name)
    if key not in _FUNCTION_PATCHES:
        params = list(inspect.signature(original).parameters)
        if params != list(inspect.signature(replacement).parameters):
            raise RuleError(f"{modeling.__name__}.{name}{inspect.signature(original)} does not match the "
                            f"replacement's arguments {params} (transformers version mismatch)")
        _FUNCTION_PATCHES[key] = original
    setattr(modeling, name, replacement)


def undo_function_patches() -> None:
    for (module_name, name), original in _FUNCTION_PATCHES.items():
        setattr(importlib.import_module(module_name), name, original)
    _FUNCTION_PATCHES.clear()


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def apply_rule(model: nn.Module, arch: dict[str, Any], kernel: str, options: Options) -> list[tuple[str, int]]:
    """Patch ``model`` (the transformers model, not a PEFT wrapper) for ``kernel``; returns (what, count) lines."""
    modeling = importlib.import_module(arch["module"])
    rule = arch[kernel]
    done: list[tuple[str, int]] = []

    if kernel == "fast_rms_layernorm":
        classes = _classes(modeling, rule["norms"])
        norms = _instances(model, classes)
        forward = modules.gemma_rms_norm_forward if rule.get("gemma") else modules.rms_norm_forward
        for norm in norms:
            _set_forward(norm, forward)
        done += [(f"{c.__name__}.forward -> triton rms_norm", sum(type(n) is c for n in norms)) for c in classes]

    elif kernel == "fast_rope_embeddings":
        _patch_function(modeling, rule["function"], modules.apply_rotary_pos_emb)
        done.append((f"{modeling.__name__.rsplit('.', 1)[-1]}.{rule['function']} -> triton rope (position-aware)", 1))

    elif kernel == "fast_swiglu" and "mlp" in rule:
        mlps = _instances(model, _classes(modeling, rule["mlp"]))
        if not all(_is_silu(m.act_fn) for m in mlps):
            raise RuleError(f"fast_swiglu needs a SiLU MLP activation; this model's is {type(mlps[0].act_fn).__name__}")
        own = [mlp for mlp in mlps if "forward" not in mlp.__dict__]  # fused_lora's MLP forward has the SwiGLU
        for mlp in own:
            _set_forward(mlp, modules.swiglu_mlp_forward)
        done.append((f"{'/'.join(rule['mlp'])}.forward -> triton swiglu", len(own)))
        done.append((f"{'/'.join(rule['mlp'])}: triton swiglu inside the fused MLP", len(mlps) - len(own)))

    elif kernel == "fast_swiglu":
        experts = _instances(model, _classes(modeling, rule["experts"]))
        for module in experts:
            impl = getattr(module.config, "_experts_implementation", None)
            if impl not in ("grouped_mm", "batched_mm") or not getattr(module, "is_concatenated", True):
                raise RuleError(f"fast_swiglu on {type(module).__name__} needs experts_implementation grouped_mm or "
                                f"batched_mm with concatenated gate/up weights (got {impl})")
            if not _is_silu(module.act_fn):
                raise RuleError(f"fast_swiglu needs a SiLU experts activation, not {type(module.act_fn).__name__}")
            _set_forward(module, modules.experts_apply_gate, "_apply_gate")
        done.append((f"{'/'.join(rule['experts'])}._apply_gate -> triton swiglu (packed gate/up)", len(experts)))

    elif kernel == "fused_lora":
        done += _apply_fused_lora(model, modeling, rule, options)

    elif kernel == "fast_loss":
        done += _apply_fast_loss(model, modeling, rule, options)

    else:
        raise RuleError(f"unknown kernel {kernel}")

    if not any(count for _, count in done):
        raise RuleError(f"{kernel}: the rule matched no modules ({'; '.join(what for what, _ in done)})")
    return [(what, count) for what, count in done if count]


def _lora_layer_ok(layer: nn.Module) -> None:
    """Raise RuleError if ``layer`` is a LoRA layer the fused op does not compute."""
    if not hasattr(layer, "lora_A"):
        return
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_variant", {}):
            raise RuleError(f"fused_lora does not support LoRA variants (DoRA and others) on {adapter}")
        if layer.lora_B[adapter].bias is not None:
            raise RuleError("fused_lora does not support lora_bias")
    if getattr(layer, "fan_in_fan_out", False):
        raise RuleError("fused_lora does not support fan_in_fan_out layers")


def _mark_fused(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer._foak_fused = True


def is_fused(layer: nn.Module) -> bool:
    return getattr(layer, "_foak_fused", False)


def _fusable_group(layers: list[nn.Module]) -> bool:
    """Projections worth fusing: at least one carries LoRA or a quantised base, and every base is frozen."""
    from .base_layers import base_layer_kind

    bases = [layer.base_layer if hasattr(layer, "lora_A") else layer for layer in layers]
    interesting = any(hasattr(layer, "lora_A") for layer in layers) or any(base_layer_kind(b) for b in bases)
    if interesting and any(p.requires_grad for b in bases for p in b.parameters()):
        raise RuleError("fused_lora needs frozen base layers (LoRA on a frozen or quantised model)")
    return interesting


def _apply_fused_lora(model, modeling, rule, options: Options) -> list[tuple[str, int]]:
    done = []
    attentions = _instances(model, _classes(modeling, rule["attention"]))
    qkv_patched = o_patched = 0
    for attn in attentions:
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        for layer in (*qkv, attn.o_proj):
            _lora_layer_ok(layer)
        if _fusable_group(qkv):
            forward = modules.fused_attention_forward(modeling, options.keep_weights, rule.get("sliding_window"),
                                                      rule.get("head_norms", False), **options.lora_op_options())
            _set_fused_forward(attn, forward)
            _mark_fused(qkv)
            qkv_patched += 1
        if hasattr(attn.o_proj, "lora_A") and _fusable_group([attn.o_proj]):
            _set_fused_forward(attn.o_proj, modules.fused_linear_forward(options.keep_weights,
                                                                         **options.lora_op_options()))
            _mark_fused([attn.o_proj])
            o_patched += 1
    name = "/".join(rule["attention"])
    done.append((f"{name} q/k/v -> one fused LoRA op", qkv_patched))
    done.append((f"{name} o_proj -> fused LoRA op", o_patched))
    if "mlp" in rule:
        mlps = _instances(model, _classes(modeling, rule["mlp"]))
        patched = 0
        for mlp in mlps:
            layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            for layer in layers:
                _lora_layer_ok(layer)
            if _fusable_group(layers):
                if options.fast_swiglu and not _is_silu(mlp.act_fn):
                    raise RuleError(f"fast_swiglu needs a SiLU MLP activation, not {type(mlp.act_fn).__name__}")
                forward = modules.fused_mlp_forward(options.keep_weights, options.fast_swiglu,
                                                    **options.lora_op_options())
                _set_fused_forward(mlp, forward)
                _mark_fused(layers)
                patched += 1
        if patched:
            swiglu = " + triton swiglu" if options.fast_swiglu else ""
            done.append((f"{'/'.join(rule['mlp'])} gate/up -> one fused op{swiglu}, down fused", patched))
    return done


def _apply_fast_loss(model, modeling, rule, options: Options) -> list[tuple[str, int]]:
    (cls,) = _classes(modeling, rule["causal_lm"])
    if not isinstance(model, cls):
        raise RuleError(f"fast_loss patches {cls.__name__}; this model is a {type(model).__name__}")
    if options.fast_loss == "fused_ce_liger":
        scale_attr = rule.get("logits_divided_by")
        logit_scale = 1.0 / getattr(model.config, scale_attr) if scale_attr else 1.0
        aux = _moe_aux_loss(modeling) if rule.get("moe_aux_loss") else None
        _set_forward(model, modules.fused_loss_forward(cls.forward, logit_scale, aux))
        return [(f"{cls.__name__}.forward -> chunked fused linear+cross-entropy (no full logits)", 1)]
    model.loss_function = modules.causal_lm_loss
    return [(f"{cls.__name__}.loss_function -> triton cross-entropy", 1)]


def _moe_aux_loss(modeling) -> Callable:
    balance = modeling.load_balancing_loss_func

    def aux_loss(model, outputs, attention_mask):
        config = model.config
        return balance(outputs.router_logits, config.num_local_experts, config.num_experts_per_tok, attention_mask)

    return aux_loss
