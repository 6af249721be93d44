"""Checkpoint only what must be: keep attention outputs (selective), or whole layers while memory allows (budget).

Selective: full checkpointing reruns each decoder layer's forward in the backward. Most of that
rerun is needed (the MLP's gate/up outputs are the largest activations), but the
attention kernel's output costs only one hidden-size tensor per token and layer to
keep, and its forward is the slowest part of the rerun at long sequences. The fused
ops add to this on their own: the MLP's down projection saves nothing, so torch's
early-stopping recompute never reruns the layer's last matmul.

Applied per decoder layer by wrapping the checkpoint function transformers installs
when gradient checkpointing is turned on (whoever turns it on, whenever), with a
torch selective-checkpoint policy; it needs non-reentrant checkpointing (the
transformers default). The same wrapper marks every recompute (:func:`recomputing`),
so the fused MLP can leave out what only the forward needs.

Unchecked last layers (``uncheckpointed_layers``): the backward starts with the last
layer, so its recompute would run first, right after the forward; run unchecked, its
activations take the place of that recompute's, and are freed before any other layer
recomputes. One such layer costs about no peak memory.

Budget (``activation_budget_gib``): padding-free steps vary in length several-fold, and
full checkpointing is sized for the longest. Before each forward, the last decoder
layers run without checkpointing, as many as the step's tokens let fit in the budget
(an estimate from the layer shapes, :func:`saved_bytes_per_token`), so a short step
skips most of its recompute. The last layers, because the backward reaches them
first: their activations are freed before the first recompute runs, so the budget
and a recomputed layer never coexist.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

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


_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed layer's forward reruns in the backward (through :func:`install_checkpoint_contexts`).

    What the rerun computes is only kept where it refills a tensor saved for the backward;
    the fused MLP uses this to skip work whose result nothing saved depends on.
    """
    return getattr(_state, "depth", 0) > 0


def checkpointed_forward() -> bool:
    """True inside the first forward of a checkpointed layer (one that will be recomputed in the backward)."""
    return getattr(_state, "forward_depth", 0) > 0


@contextlib.contextmanager
def _marking(attribute: str, inner=None):
    with inner if inner is not None else contextlib.nullcontext():
        setattr(_state, attribute, getattr(_state, attribute, 0) + 1)
        try:
            yield
        finally:
            setattr(_state, attribute, getattr(_state, attribute) - 1)


def _contexts(policy_ops: set | None):
    """A checkpoint ``context_fn``: marks the forward and the recompute, keeps ``policy_ops``' outputs if given."""

    def context_fn():
        if policy_ops is None:
            return _marking("forward_depth"), _marking("depth")
        forward, recompute = create_selective_checkpoint_contexts(keep_attention_policy(policy_ops))
        return _marking("forward_depth", forward), _marking("depth", recompute)

    return context_fn


def _wrap(checkpoint_fn, context_fn):
    """``checkpoint_fn`` with ``context_fn``, or None where that cannot apply.

    Only torch's own checkpoint, non-reentrant, without a context_fn already chosen (which is
    respected): reentrant checkpointing takes no contexts, and another plugin's (or a compiled
    layer's) checkpoint function is left as it is.
    """
    if not (isinstance(checkpoint_fn, functools.partial) and checkpoint_fn.func is torch.utils.checkpoint.checkpoint):
        return None
    keywords = checkpoint_fn.keywords or {}
    if keywords.get("use_reentrant", False) or "context_fn" in keywords:
        return None

    def wrapped(function, *args, **kwargs):
        if torch.compiler.is_compiling():  # a layer compiled by another plugin: its graph takes no such contexts
            return checkpoint_fn(function, *args, **kwargs)
        return checkpoint_fn(function, *args, context_fn=context_fn, **kwargs)

    wrapped._foak_wrapped = True
    return wrapped


def install_checkpoint_contexts(backbone: nn.Module, selective_layers: list[nn.Module] = ()) -> None:
    """From the next forward on, every checkpointed layer of ``backbone`` marks its recompute (:func:`recomputing`).

    ``selective_layers`` also keep their attention outputs (selective checkpointing). Installed
    at each forward because transformers sets the layers' checkpoint function whenever
    checkpointing is turned on, by whoever. Where the function cannot take contexts, the
    layers keep it; a warning says so when selective checkpointing was asked for.
    """
    selective = {id(layer) for layer in selective_layers}
    marked, kept = _contexts(None), _contexts(attention_ops()) if selective else None
    warned = []
    # transformers gives a checkpoint function only to modules with a gradient_checkpointing flag; found once, as
    # walking every module (1,700 at llama3-8b with LoRA) each step took ~1 ms of host time at the step's start
    checkpointable: list[nn.Module] = []

    def pre_hook(module, args):
        if not checkpointable:
            checkpointable.extend(m for m in module.modules() if hasattr(m, "gradient_checkpointing"))
        for layer in checkpointable:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is None or getattr(fn, "_foak_wrapped", False) or getattr(fn, "_foak_declined", False):
                continue
            wrapped = _wrap(fn, kept if id(layer) in selective else marked)
            if wrapped is None:
                if selective and not warned:
                    warned.append(True)
                    logger.warning("fmsaccel_foak: selective checkpointing needs torch's non-reentrant checkpointing "
                                   "without another context_fn; keeping full checkpointing")
                fn = functools.partial(fn)
                fn._foak_declined = True
                layer._gradient_checkpointing_func = fn
                continue
            wrapped._foak_selective = id(layer) in selective
            layer._gradient_checkpointing_func = wrapped

    backbone.register_forward_pre_hook(pre_hook)


def saved_bytes_per_token(config, dropout_masks: bool = True) -> int:
    """Bytes one decoder layer keeps for its backward, per token, when it is not checkpointed (an upper estimate).

    Calibrated on a Llama layer with foak's kernels and LoRA (dropout) on q/k/v/o, which keeps
    nine hidden-size tensors (norm and LoRA inputs, q and the GQA-repeated k and v, the
    attention output), k and v before the repeat, and the MLP's gate and up (times the
    experts a token visits). The estimate adds two hidden-size and one intermediate-size
    tensor of margin for what Inductor and the GPU attention kernels keep differently; the
    tests hold it between 1 and 1.5 times what the patched layer saves. Without
    ``dropout_masks`` (``dropout_in_kernel``), q/k/v and o keep no dropout mask: four
    hidden-size tensors fewer.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None)
    intermediate = (intermediate or 4 * hidden) * (getattr(config, "num_experts_per_tok", None) or 1)
    intermediate += getattr(config, "shared_expert_intermediate_size", None) or 0
    element = 2  # bf16/fp16 activations; an fp32 model gets half the layers it could afford, never more
    per_head = 4 + 4  # fp32 log-sum-exp of the attention, slack
    hidden_sized = 11 if dropout_masks else 7
    return element * (hidden_sized * hidden + 2 * kv_width + 3 * intermediate) + per_head * heads + 4 * head_dim + 256


def layers_to_keep(n_layers: int, tokens: int, budget_bytes: int, bytes_per_token: int) -> int:
    """How many decoder layers a step of ``tokens`` tokens can run without checkpointing."""
    if tokens <= 0:
        return n_layers
    return max(0, min(n_layers, budget_bytes // (tokens * bytes_per_token)))


def enable_activation_budget(decoder: nn.Module, layers: list[nn.Module], budget_bytes: int,
                             bytes_per_token: int, always: int = 0) -> None:
    """Before each training forward of ``decoder``, un-checkpoint the last layers that fit in ``budget_bytes``.

    At least the last ``always`` layers, whatever the step's length (``uncheckpointed_layers``).

    Acts on the layers transformers checkpoints (their ``gradient_checkpointing`` flag) and
    turns the ones it released back on at the next forward, unless checkpointing was turned
    off for the whole model in between (``gradient_checkpointing_disable`` clears the
    decoder's own flag too). A released layer's fused LoRA ops stop keeping their dequantised
    weights for the backward (``_foak_keep_weights``): that copy is free only where the
    recompute runs right before the backward, and would cost ~0.4 GiB a layer at 8B here.
    """
    fused = {id(layer): [m for m in layer.modules() if "_foak_keep_weights" in m.__dict__] for layer in layers}
    released: list[nn.Module] = []  # layers this hook turned off for the current step

    def set_checkpointing(layer: nn.Module, on: bool) -> None:
        layer.gradient_checkpointing = on
        for module in fused[id(layer)]:  # kept weights serve only a recompute
            module._foak_keep_weights = on

    def pre_hook(module, args, kwargs):
        still_on = bool(getattr(module, "gradient_checkpointing", True))
        for layer in released:
            set_checkpointing(layer, still_on)
        released.clear()
        checkpointed = [layer for layer in layers if layer.gradient_checkpointing]
        if not module.training or not torch.is_grad_enabled() or not checkpointed:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids.numel() if ids is not None else kwargs["inputs_embeds"][..., 0].numel()
        keep = max(min(always, len(checkpointed)),
                   layers_to_keep(len(checkpointed), tokens, budget_bytes, bytes_per_token))
        for layer in checkpointed[len(checkpointed) - keep:]:
            set_checkpointing(layer, False)
            released.append(layer)

    decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
