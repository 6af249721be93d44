"""Regional compilation: ``torch.compile`` on every decoder layer (or the whole decoder stack), after all patches.

Shared by the plugins that compile (foak's ``compile_layers``, accelerated-moe's); the
first one to ask compiles, the others find the layers compiled (:func:`compiled_layers`).

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
idempotent (per-forward metadata caches, one-time notices), so it is told. With
``checkpoint_in_graph`` (and always with CUDA graphs) foak puts the checkpoint inside each
layer's region on 5.1x too (:func:`checkpoint_inside`).
"""

from __future__ import annotations

import functools

from torch import nn

# Inductor generates the kernels. CPU tests of the compile plumbing (graphs, breaks, checkpoint placement, the
# partition) swap in "aot_eager_decomp_partition", which traces and partitions alike without compiling C++.
COMPILE_BACKEND = "inductor"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (transformers' checkpointable layer class)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compiled_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` that :func:`compile_decoder_layers` (or ``nn.Module.compile``) compiled."""
    layers = decoder_layers(model)
    if layers and getattr(model.get_decoder(), "_compiled_call_impl", None) is not None:
        return layers
    return [layer for layer in layers if getattr(layer, "_compiled_call_impl", None) is not None]


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


def compile_decoder_layers(
    model: nn.Module, scope: bool | str = True, cuda_graphs: bool = False, checkpoint_in_graph: bool = False,
    cse: bool = True,
) -> list[nn.Module]:
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

    ``checkpoint_in_graph`` (scope True; the plugin sets it with ``cuda_graphs``): see :func:`checkpoint_inside`.

    ``cse`` False turns off AOTAutograd's common-subexpression elimination in the joint graph.
    The fused LoRA ops dequantise a frozen weight again in the backward rather than keep it
    (unless a checkpoint recompute is about to serve it); CSE merges bitsandbytes'
    dequantisation (a functional op) in the backward with the forward's, and the partitioner
    then saves every unchecked layer's dequantised weights: s10c4, llama3-8b, 21.6 GiB instead
    of 10.5 (s10c5). Our GPTQ dequantisation, a Triton kernel on the GPU, is not merged
    (10.9 GiB with CSE), and CSE pays there: its median R step was 0.21 s with it (s10c4) and
    0.25 s without (s10c5).
    """
    import torch
    import torch._dynamo

    if not cse:
        torch._functorch.config.cse = False  # read when each graph compiles; our layers are the process's graphs
    # Dynamo's DDPOptimizer splits a graph compiled under DDP's forward at gradient-bucket boundaries, assuming it
    # sees the whole model. Our regions are single layers (their gradients arrive together at the end of the layer's
    # backward graph anyway), and the split crashed on a float crossing two pieces (s12c3, 2 GPUs:
    # "'float' object has no attribute 'meta'"; pytorch/pytorch#196227).
    torch._dynamo.config.optimize_ddp = False
    no_size_guards()
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    traceable_output_capture()
    layers = decoder_layers(model)
    mode = "reduce-overhead" if cuda_graphs else None
    if cuda_graphs and layers:
        model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    if layers:
        warn_if_not_compiled(model)
    if scope == "model" and layers:
        model.get_decoder().compile(dynamic=True, mode=mode, backend=COMPILE_BACKEND)
        return layers
    if checkpoint_in_graph and layers:
        checkpoint_inside(model, layers)
    for layer in layers:
        layer.compile(dynamic=True, mode=mode, backend=COMPILE_BACKEND)
    return layers


def no_size_guards() -> None:
    """Turn off the Inductor heuristics that guard on a dynamic size. A guard on the token count recompiles every
    compiled layer the first time a batch crosses it: mix-order reductions (sibling reductions of one tensor along
    rows and columns, as trainable norm weights give) fuse only above ``4096 * tokens >= 5 * 2**20`` elements (s13c3,
    mixtral full fine-tuning: a 13 s recompile mid-run, at the first batch of 1,280 tokens)."""
    import torch._inductor.config as inductor

    if hasattr(inductor.triton, "mix_order_reduction"):
        inductor.triton.mix_order_reduction = False


def compile_problems() -> list[str]:
    """What kept compiled code from being whole graphs so far (Dynamo's counters): each graph break's reason, or
    that nothing was compiled at all (a break inside a checkpointed region makes Dynamo run the region eagerly)."""
    import torch._dynamo

    counters = torch._dynamo.utils.counters
    breaks = counters["graph_break"].items()
    problems = [f"graph break ({count}x): {reason.splitlines()[0]}" for reason, count in breaks]
    if not counters["stats"].get("unique_graphs"):
        problems.append("no graph was compiled: the layers ran eagerly")
    return problems


def warn_if_not_compiled(model: nn.Module) -> None:
    """After the first training forward (which compiles), say loudly if the layers are not whole compiled graphs:
    a silent eager fallback would cost the run its speed without a word."""
    import logging

    def check(module, args, output):
        if not module.training:
            return
        handle.remove()
        problems = compile_problems()
        if problems:
            logging.getLogger(__name__).warning(
                "compile_layers: the decoder layers are not one compiled graph each; %s", "; ".join(problems[:4]))

    handle = model.register_forward_hook(check)


SUPPLIED_OUTPUTS: set[str] = set()  # recorded outputs that a plugin hands over from compiled layers itself


def supply_output(name: str) -> None:
    """Declare that a plugin puts the recorded output ``name`` (e.g. ``router_logits``) into the model's output
    from compiled layers itself, so asking for it does not warn."""
    SUPPLIED_OUTPUTS.add(name)


class _CollectorOutsideGraphs:
    """transformers' output collector, switched off inside compiled regions.

    transformers records outputs a model does not return itself (the MoE router logits of the
    load-balancing loss, which TRL turns on) with forward hooks that read the active collector
    from a ``ContextVar``. With regional compilation those hooks run inside compiled layers,
    where ``ContextVar.get`` cannot be traced: a graph break per hooked module, and inside a
    layer checkpointed by transformers 5.2x the whole layer then runs eagerly. A plain global
    instead makes Dynamo guard on the length of the list being filled, a recompilation per
    layer. So inside a compiled region the hooks see no collector and record nothing; a plugin
    that needs an output from compiled layers supplies it another way and says so with
    :func:`supply_output` (accelerated-moe: the router logits, ``fmsaccel_moe.router_logits``);
    asking for any other recorded output warns once. Outside compiled regions nothing changes.
    """

    def __init__(self, collector) -> None:
        self.collector = collector
        self.warned = False

    def get(self):
        import torch

        return None if torch.compiler.is_compiling() else self.collector.get()

    def set(self, value):
        missing = sorted(k for k in (value or {}) if not k.startswith("_") and k not in SUPPLIED_OUTPUTS)
        if missing and not self.warned:  # e.g. output_hidden_states, or MoE router logits no plugin supplies
            import logging

            logging.getLogger(__name__).warning(
                "compiled decoder layers record no %s (transformers' output hooks cannot run inside them); "
                "those outputs miss the compiled layers' share", ", ".join(missing))
            self.warned = True
        return self.collector.set(value)

    def reset(self, token) -> None:
        self.collector.reset(token)


def traceable_output_capture() -> bool:
    """Install :class:`_CollectorOutsideGraphs` in transformers (False: this transformers has no such collector)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return False
    current = getattr(output_capturing, "_active_collector", None)
    if current is None or not all(hasattr(current, name) for name in ("get", "set", "reset")):
        return False
    if not isinstance(current, _CollectorOutsideGraphs):
        output_capturing._active_collector = _CollectorOutsideGraphs(current)
    return True


def _run_directly(function, *args):
    """Stands in for a layer's checkpoint function where foak checkpoints inside the compiled region instead."""
    return function(*args)


def checkpoint_inside(model: nn.Module, layers: list[nn.Module]) -> None:
    """Gradient checkpointing of ``layers`` runs inside each layer's compiled region, whatever transformers does.

    transformers up to 5.1x checkpoints a layer's ``__call__``, around the compiled region, so
    the recompute replays the layer's forward graph in the middle of the backward. CUDA graph
    trees cannot record that consistently (s9c2, llama3-8b: "graph recording observed an input
    tensor deallocate during graph recording that did not occur during replay"). Here each
    layer's own ``forward`` calls the checkpoint function, so Dynamo traces it as a recompute
    region of the layer's graph and the backward graph recomputes by itself; transformers'
    call site (wherever it is) gets a pass-through. The checkpoint function stays the one
    transformers installs (``gradient_checkpointing_enable``, whoever calls it, whenever): a
    pre-hook on ``model`` moves it into place before each forward.

    Without CUDA graphs it also saves host time: each layer's compiled forward runs once a
    step instead of twice (forward and recompute), with one guard check instead of two.
    """

    def move_checkpoint_functions(*_):
        for layer in layers:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and fn is not _run_directly:
                layer._foak_checkpoint_func = fn
                layer._gradient_checkpointing_func = _run_directly

    for layer in layers:
        layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward)
    model.register_forward_pre_hook(move_checkpoint_functions)


def _checkpointed_forward(layer: nn.Module, forward, *args, **kwargs):
    import torch

    checkpoint = getattr(layer, "_foak_checkpoint_func", None)
    if checkpoint is not None and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(functools.partial(forward, **kwargs), *args)
    return forward(*args, **kwargs)
