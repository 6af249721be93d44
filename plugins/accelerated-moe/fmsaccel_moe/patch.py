"""Install the ScatterMoE forward on each experts module found by the rule table.

The forward goes on the module the MoE block calls (``block.experts``): the experts
module itself or, with LoRA on expert parameters, PEFT's outermost ``ParamWrapper``,
whose own forward (a dense ``W + B @ A`` per call) is thereby bypassed. Per-module
settings live on the experts module as ``_fmsaccel_moe``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from .expert_parallel import EPShard, ep_routed_experts
from .graph_ops import routed_experts_op
from .lora import expert_lora_factors
from .ops import fuse_swiglu_for, routed_experts
from .rules import MoESite, unwrap


@dataclass
class ExpertsSettings:
    backend: str  # "triton" | "grouped_mm"
    shard: EPShard | None = None
    fuse_swiglu: bool | None = None  # None: ops.fuse_swiglu_for decides


def scattermoe_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Drop-in for ``<Arch>Experts.forward(hidden_states, top_k_index, top_k_weights)``.

    Inside a compiled decoder layer plain experts are traced as custom ops (``graph_ops``); LoRA on
    experts, 4-bit experts and sharded experts run eagerly between the layer's graphs.
    """
    experts = unwrap(self)
    settings: ExpertsSettings = experts._fmsaccel_moe
    if torch.compiler.is_compiling():
        if runs_in_graph(self):
            gate_up, down = experts.gate_up_proj, experts.down_proj
            fuse = fuse_swiglu_for(down, settings.fuse_swiglu)
            x = hidden_states.to(gate_up.dtype)
            out = routed_experts_op(x, top_k_index, top_k_weights, gate_up, down, settings.backend, fuse)
            return out.to(hidden_states.dtype)
        return _experts_between_graphs(self, experts, settings, hidden_states, top_k_index, top_k_weights)
    return _eager_experts(self, experts, settings, hidden_states, top_k_index, top_k_weights)


def runs_in_graph(head: torch.nn.Module) -> bool:
    """Whether a compiled layer traces these experts as custom ops (``graph_ops``): plain 16-bit weights, no
    LoRA on them (``head`` is the experts module itself), not sharded. Others run between the layer's graphs."""
    experts = unwrap(head)
    plain = torch.is_tensor(experts.gate_up_proj) and torch.is_tensor(experts.down_proj)
    return plain and head is experts and experts._fmsaccel_moe.shard is None


def _eager_experts(self, experts, settings: ExpertsSettings, hidden_states, top_k_index, top_k_weights):
    """Our autograd functions (a compiled layer calls them between its graphs: Dynamo would break on
    their Python state piecemeal)."""
    lora = expert_lora_factors(self) if self is not experts else {}
    if settings.shard is not None:
        return ep_routed_experts(
            hidden_states,
            top_k_index,
            top_k_weights,
            experts.gate_up_proj,
            experts.down_proj,
            settings.shard,
            num_experts=experts._fmsaccel_num_experts,
            backend=settings.backend,
            fuse_swiglu=settings.fuse_swiglu,
        )
    return routed_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        experts.gate_up_proj,
        experts.down_proj,
        backend=settings.backend,
        lora_gate_up=lora.get("gate_up_proj"),
        lora_down=lora.get("down_proj"),
        fuse_swiglu=settings.fuse_swiglu,
    )

_experts_between_graphs = torch.compiler.disable(_eager_experts)


def is_patched(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is scattermoe_forward


def patch_site(site: MoESite, settings: ExpertsSettings) -> bool:
    """Patch one block's experts; False when it already was (idempotent, e.g. after PEFT wrapped it)."""
    site.experts._fmsaccel_moe = settings
    head = site.head
    if is_patched(head):
        return False
    head.forward = types.MethodType(scattermoe_forward, head)
    return True


def unpatch_site(site: MoESite) -> None:
    for module in (site.head, site.experts):
        module.__dict__.pop("forward", None)
