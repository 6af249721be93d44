"""Expert parallelism: experts sharded over ``ep_degree`` ranks, tokens exchanged all-to-all.

Ranks ``[g*ep, (g+1)*ep)`` form an EP group that shares one copy of the experts,
rank ``i`` of the group holding experts ``[i*E/ep, (i+1)*E/ep)``. Every rank routes
its own tokens, sends each (token, expert) row to the rank owning the expert (counts
exchanged first), runs its local experts on what it received, sends the rows back and
combines them with its routing weights. Ranks holding the same shard in different EP
groups are *replicas* of it.

Three things the data-parallel wrapper cannot know are done here:

- expert gradients are averaged over the whole world (their contributions already
  came back through the all-to-all from every rank of the EP group, so only replicas
  need a reduction); DDP is told to ignore the shards;
- gradient clipping uses the norm of the *whole* model, expert shards of the other
  ranks included (otherwise every rank clips by a different factor and the replicated
  weights drift apart);
- saving gathers the shards, so checkpoints have Hugging Face's full layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmsaccel_framework.plugin import PluginError

from .ops import routed_experts
from .routing import route

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


@dataclass
class EPShard:
    """This rank's place in expert parallelism."""

    group: dist.ProcessGroup  # the ranks sharing one copy of the experts
    replicas: dist.ProcessGroup | None  # ranks holding the same shard (None: no replicas)
    rank: int  # position in ``group``
    size: int  # ep_degree
    world: int

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        local = num_experts // self.size
        return self.rank * local, (self.rank + 1) * local


def init_expert_parallel(ep_degree: int) -> EPShard:
    """Create the EP and replica process groups (every rank must call this, in the same order)."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise PluginError(f"accelerated-moe: ep_degree={ep_degree} needs a distributed launch (torchrun)")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_degree:
        raise PluginError(f"accelerated-moe: ep_degree={ep_degree} does not divide the world size {world}")
    group = replicas = None
    for g in range(world // ep_degree):
        ranks = list(range(g * ep_degree, (g + 1) * ep_degree))
        new = dist.new_group(ranks)
        if rank in ranks:
            group = new
    if world > ep_degree:
        for i in range(ep_degree):
            ranks = list(range(i, world, ep_degree))
            new = dist.new_group(ranks)
            if rank in ranks:
                replicas = new
    return EPShard(group=group, replicas=replicas, rank=rank % ep_degree, size=ep_degree, world=world)


def shard_experts(experts: torch.nn.Module, shard: EPShard) -> None:
    """Keep only this rank's experts (same parameter objects, smaller data)."""
    num_experts = experts.gate_up_proj.size(0)
    if num_experts % shard.size:
        raise PluginError(f"accelerated-moe: ep_degree={shard.size} does not divide the {num_experts} experts")
    lo, hi = shard.expert_range(num_experts)
    for name in EXPERT_PARAMETERS:
        param = getattr(experts, name)
        param.data = param.data[lo:hi].clone()
    experts._fmsaccel_num_experts = num_experts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, d_out):
        out_splits, in_splits = ctx.splits
        d_x = d_out.new_empty(sum(in_splits), *d_out.shape[1:])
        dist.all_to_all_single(d_x, d_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return d_x, None, None, None


def ep_routed_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shard: EPShard,
    *,
    num_experts: int,
    backend: str,
    fuse_swiglu: bool | None = None,
) -> torch.Tensor:
    """``ops.routed_experts`` with the experts spread over the EP group."""
    tokens, top_k = top_k_index.shape
    local = num_experts // shard.size
    routing = route(top_k_index, num_experts)  # sorted by expert, hence by destination rank
    send_counts = routing.counts.view(shard.size, local).sum(1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=shard.group)
    send, recv = send_counts.tolist(), recv_counts.tolist()

    rows = hidden_states.index_select(0, routing.token.long())
    local_expert = torch.empty(sum(recv), dtype=routing.expert.dtype, device=routing.expert.device)
    dist.all_to_all_single(local_expert, (routing.expert % local).contiguous(), recv, send, group=shard.group)
    received = _AllToAll.apply(rows, recv, send, shard.group)

    done = routed_experts(
        received, local_expert.long()[:, None], None, gate_up_proj, down_proj, backend=backend, fuse_swiglu=fuse_swiglu
    )
    returned = _AllToAll.apply(done, send, recv, shard.group)

    per_slot = returned[routing.inverse()].view(tokens, top_k, -1)
    out = (per_slot.float() * top_k_weights.float()[..., None]).sum(1)
    return out.to(hidden_states.dtype)


def average_expert_grads(params: Iterable[torch.nn.Parameter], shard: EPShard) -> list:
    """Hooks making each shard's gradient the world average, as DDP does for the other weights."""

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad / shard.world
        if shard.replicas is not None:
            dist.all_reduce(grad, group=shard.replicas)
        return grad

    return [p.register_hook(reduce) for p in params if p.requires_grad]


def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    expert_params: set[int],
    shard: EPShard,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model when experts are sharded.

    The squared norms of this rank's expert shards are summed over the EP group; the
    other gradients are replicated (DDP) and count once.
    """
    if float(norm_type) != 2.0:
        raise PluginError(f"accelerated-moe: clipping with sharded experts supports the 2-norm, not {norm_type}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [(id(p) in expert_params, p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0][1].device
    dense = torch.zeros((), device=device, dtype=torch.float32)
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    for is_expert, g in grads:
        sq = g.detach().float().pow(2).sum()
        if is_expert:
            sharded += sq
        else:
            dense += sq
    dist.all_reduce(sharded, group=shard.group)
    total = (dense + sharded).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.detach().mul_(coef.to(g.dtype))
    return total


@contextmanager
def gathered_experts(experts_modules: Iterable[torch.nn.Module], shard: EPShard) -> Iterator[None]:
    """Temporarily give every rank the full expert weights (for saving in Hugging Face's layout)."""
    swapped = []
    try:
        for experts in experts_modules:
            for name in EXPERT_PARAMETERS:
                param = getattr(experts, name)
                parts = [torch.empty_like(param.data) for _ in range(shard.size)]
                dist.all_gather(parts, param.data.contiguous(), group=shard.group)
                swapped.append((param, param.data))
                param.data = torch.cat(parts, 0)
        yield
    finally:
        for param, local in swapped:
            param.data = local
