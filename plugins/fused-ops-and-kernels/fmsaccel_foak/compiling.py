"""Regional compilation: ``torch.compile`` on every decoder layer (or the whole decoder stack), after all patches.

Short-sequence steps (padding-free batches of a few hundred tokens a layer) are paced
by the CPU: Python, autograd and hundreds of small kernel launches per layer. Compiling
each decoder layer turns its forward and backward into one graph each (the fused ops,
their Triton kernels, RoPE, the padding-free attention and the norms included), with
the elementwise work fused by Inductor. All layers share the same code, so one
compilation serves them all; ``dynamic=True`` keeps one graph across row lengths
instead of recompiling for each new length.

Gradient checkpointing: transformers up to 5.1x checkpoints the layer's ``__call__``,
so the checkpoint stays outside the compiled region and the recompute reruns the
compiled forward; later versions checkpoint ``forward``, inside it, where Dynamo traces
the checkpoint as a region the partitioner recomputes. Inside that region Dynamo refuses
Python side effects unless told they need no replay in the recompute; ours are
idempotent (per-forward metadata caches, one-time notices), so it is told.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (transformers' checkpointable layer class)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def skip_reason(model: nn.Module, fsdp: bool) -> str | None:
    """Why the layers of ``model`` stay eager under ``compile_layers`` (None: compile them).

    FSDP puts its sharding hooks on the decoder layers; on the CPU there is no launch overhead
    to remove, and Dynamo cannot trace Triton's interpreter.
    """
    if fsdp:
        return "FSDP puts its sharding hooks on the decoder layers"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"the model is on {device.type}, not a CUDA GPU; compiling pays only where kernel launches do"
    return None


def compile_decoder_layers(model: nn.Module, scope: bool | str = True, cuda_graphs: bool = False) -> list[nn.Module]:
    """Compile the decoder layers of ``model`` in place; returns the layers compiled.

    ``scope`` True: each layer is its own region (one graph shared by all). ``"model"``: the
    decoder stack (``model.get_decoder()``, embeddings to final norm) is one region, so a
    step pays one guard check and one compiled call forward and backward instead of one per
    layer, and the checkpoint recompute runs inside the backward graph; it traces every layer,
    so the first step compiles for longer.

    ``cuda_graphs``: compiled in ``reduce-overhead`` mode, so Inductor's CUDA graph trees record
    each compiled forward and backward once per input shape and replay them: a step launches
    a few graphs (two per layer, or two for the stack) instead of thousands of kernels. The
    trees chain the layers' graphs in call order and share one memory pool along the chain.
    A new step is marked before each forward of ``model``: training, not the trees'
    heuristics, decides when the previous step's outputs are dead.
    """
    import torch
    import torch._dynamo

    from .ops.rms_norm import sm_count

    if torch.cuda.is_available():
        sm_count(torch.device("cuda"))  # asked now, eagerly: device queries are not traced
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model)
    mode = "reduce-overhead" if cuda_graphs else None
    if cuda_graphs and layers:
        model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    if scope == "model" and layers:
        model.get_decoder().compile(dynamic=True, mode=mode)
        return layers
    for layer in layers:
        layer.compile(dynamic=True, mode=mode)
    return layers
