"""The routed experts as two opaque custom ops, so a compiled decoder layer keeps them in its graph.

Inside ``torch.compile`` (``compile_layers``) Dynamo cannot trace our autograd functions:
their routing state and kernel launches (Triton autotuners, grouped GEMM offsets) are
Python. A graph break there splits each layer, and inside a checkpointed region (where
transformers 5.2x calls the layer's forward) a break makes Dynamo run the whole layer
eagerly. As ``torch.library`` custom ops with shape-only fake implementations, the
experts are one node in the forward graph and one in the backward graph; Inductor
compiles everything around them.

The forward op also returns what the backward needs (``gate_up`` and the sorted
routing), so the partitioner saves those instead of anything recomputed; the backward
op writes ``gate_up``'s gradient over it (its only use), which keeps the backward's peak at
plain transformers' (mixtral full fine-tuning, s14c3). Covered:
plain 16-bit experts (full fine-tuning or frozen, LoRA elsewhere). LoRA on experts,
4-bit experts and expert parallelism go through the eager path, between graphs.
"""

from __future__ import annotations

import torch

from .ops import backend_module, linear_backward, sorted_weights, swiglu_down_backward, swiglu_down_combine
from .routing import Routing, route

Tensor = torch.Tensor


def routed_experts_op(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                      down_proj: Tensor, backend: str, fuse: bool) -> Tensor:
    """``ops.routed_experts`` (same arguments, same numbers) as custom ops; ``x`` in the weights' dtype."""
    return _forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, backend, fuse)[0]


def _routing(expert: Tensor, slot: Tensor, token: Tensor, counts: Tensor, num_experts: int, top_k: int) -> Routing:
    return Routing(expert, slot, token, counts, counts.cumsum(0), num_experts, top_k)


@torch.library.custom_op("fmsaccel_moe::routed_experts", mutates_args=())
def _forward(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
             backend: str, fuse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``out`` and, for the backward, ``gate_up`` and the routing (expert, slot, token, counts)."""
    impl = backend_module(backend)
    routing = route(top_k_index, gate_up_proj.size(0))
    gate_up = impl.expert_mm(x, gate_up_proj, routing, gather=True)
    weights = sorted_weights(top_k_weights, routing.slot)
    out = swiglu_down_combine(gate_up, down_proj, routing, weights, impl, fuse)
    return out, gate_up, routing.expert, routing.slot, routing.token, routing.counts


@_forward.register_fake
def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj, backend, fuse):
    rows = top_k_index.numel()
    index = lambda: top_k_index.new_empty(rows, dtype=torch.int32)  # noqa: E731
    return (x.new_empty(x.size(0), down_proj.size(1)), x.new_empty(rows, gate_up_proj.size(1)),
            index(), index(), index(), top_k_index.new_empty(gate_up_proj.size(0), dtype=torch.int64))


@torch.library.custom_op("fmsaccel_moe::routed_experts_backward", mutates_args=())
def _backward(d_out: Tensor, x: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
              gate_up: Tensor, expert: Tensor, slot: Tensor, token: Tensor, counts: Tensor, backend: str, fuse: bool,
              wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for x, top_k_weights, gate_up_proj and down_proj (empty where ``wanted`` says not)."""
    impl = backend_module(backend)
    top_k = top_k_weights.size(1)
    routing = _routing(expert, slot, token, counts, gate_up_proj.size(0), top_k)
    weights = sorted_weights(top_k_weights, slot)
    want_x, want_weights, want_gate_up, want_down = wanted
    # gate_up is the forward op's own output, saved for this op alone: its gradient is written over it (the
    # schema does not declare the mutation, so compiled graphs keep no copy). A second backward through the same
    # graph would read the gradient: refused below when autograd calls this eagerly; a compiled backward graph run
    # twice (retain_graph) is not guarded, and training never does that
    d_gate_up, d_down, d_rows = swiglu_down_backward(d_out, gate_up, down_proj, routing=routing, weights=weights,
                                                     backend=impl, fuse=fuse, want_down=want_down,
                                                     overwrite_gate_up=True)
    d_x, d_gate_up_proj = linear_backward(d_gate_up, x, gate_up_proj, routing, True, impl, want_x, want_gate_up)
    d_top_k = None
    if want_weights:  # sorted rows back to slot order
        d_top_k = torch.zeros(top_k_weights.numel(), dtype=d_rows.dtype, device=d_rows.device)
        d_top_k[slot.long()] = d_rows
        d_top_k = d_top_k.view_as(top_k_weights).to(top_k_weights.dtype)
    return tuple(g if g is not None else x.new_empty(0) for g in (d_x, d_top_k, d_gate_up_proj, d_down))


@_backward.register_fake
def _(d_out, x, top_k_weights, gate_up_proj, down_proj, gate_up, expert, slot, token, counts, backend, fuse, wanted):
    like = (x, top_k_weights, gate_up_proj, down_proj)
    return tuple(torch.empty_like(t) if want else x.new_empty(0) for t, want in zip(like, wanted, strict=True))


def _setup_context(ctx, inputs, output):
    x, _, top_k_weights, gate_up_proj, down_proj, backend, fuse = inputs
    _, gate_up, expert, slot, token, counts = output
    ctx.save_for_backward(x, top_k_weights, gate_up_proj, down_proj, gate_up, expert, slot, token, counts)
    ctx.backend, ctx.fuse = backend, fuse
    ctx.mark_non_differentiable(gate_up, expert, slot, token, counts)


def _autograd_backward(ctx, d_out, *_):
    wanted = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4)]
    if not any(wanted):
        return (None,) * 7
    if getattr(ctx, "consumed", False):
        raise RuntimeError("the routed experts' backward reuses its saved gate/up activations for their gradient, "
                           "so it runs once per forward: backward through the same graph twice (retain_graph) is "
                           "not supported with compiled MoE layers")
    ctx.consumed = True
    grads = _backward(d_out.contiguous(), *ctx.saved_tensors, ctx.backend, ctx.fuse, wanted)
    d_x, d_top_k, d_gate_up_proj, d_down = (g if want else None for g, want in zip(grads, wanted, strict=True))
    return d_x, None, d_top_k, d_gate_up_proj, d_down, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
