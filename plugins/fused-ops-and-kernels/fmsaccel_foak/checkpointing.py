"""Selective activation checkpointing: under gradient checkpointing, keep the attention output, recompute the rest.

Full checkpointing reruns each decoder layer's forward in the backward. Most of that
rerun is needed (the MLP's gate/up outputs are the largest activations), but the
attention kernel's output costs only one hidden-size tensor per token and layer to
keep, and its forward is the slowest part of the rerun at long sequences. The fused
ops add to this on their own: the MLP's down projection saves nothing, so torch's
early-stopping recompute never reruns the layer's last matmul.

Applied per decoder layer by wrapping the checkpoint function transformers installs
when gradient checkpointing is turned on (whoever turns it on, whenever), with a
torch selective-checkpoint policy; it needs non-reentrant checkpointing (the
transformers default).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

logger = logging.getLogger("fmsaccel_foak")
_ATTENTION_OPS = {
    "aten": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"),
    "flash_attn": ("_flash_attn_forward", "_flash_attn_varlen_forward"),  # the flash-attn package, when loaded
}


def attention_ops() -> set:
    """The attention kernels' forward ops that exist in this process."""
    found = set()
    for namespace, names in _ATTENTION_OPS.items():
        for name in names:
            try:
                found.add(getattr(getattr(torch.ops, namespace), name).default)
            except (AttributeError, RuntimeError):
                continue
    return found


def keep_attention_policy(ops: set):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _wrap(checkpoint_fn, context_fn):
    keywords = getattr(checkpoint_fn, "keywords", {}) or {}
    if keywords.get("use_reentrant", False) or "context_fn" in keywords:
        return None  # reentrant checkpointing cannot be selective; a context_fn already chosen is respected
    wrapped = functools.partial(checkpoint_fn, context_fn=context_fn)
    wrapped._foak_selective = True
    return wrapped


def enable_selective_checkpointing(backbone: nn.Module) -> None:
    """From the next forward on, every checkpointed layer of ``backbone`` keeps its attention outputs."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, keep_attention_policy(attention_ops()))
    warned = []

    def pre_hook(module, args):
        for layer in module.modules():
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is None or getattr(fn, "_foak_selective", False) or getattr(fn, "_foak_declined", False):
                continue
            wrapped = _wrap(fn, context_fn)
            if wrapped is None:
                if not warned:
                    warned.append(True)
                    logger.warning("fmsaccel_foak: selective checkpointing needs non-reentrant checkpointing "
                                   "without another context_fn; keeping full checkpointing")
                fn = functools.partial(fn)
                fn._foak_declined = True
                layer._gradient_checkpointing_func = fn
                continue
            layer._gradient_checkpointing_func = wrapped

    backbone.register_forward_pre_hook(pre_hook)
