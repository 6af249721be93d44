"""Sort token-expert assignments by expert once; every grouped kernel then reads this.

A router picks ``K`` experts for each of ``T`` tokens: ``S = T * K`` *slots*, slot
``t * K + k`` being token ``t``'s ``k``-th choice. Sorting the slots by expert gives
contiguous per-expert groups of *rows*, and the kernels gather their input rows from
the unsorted tokens and scatter their output rows back to slot order, so no padded or
per-expert copy of the tokens is ever made (the ScatterMoE idea).

No host synchronisation happens here: group sizes stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# On CUDA, route() and Routing.blocks() run routing_kernels (two Triton launches for some thirty torch ops); the
# plugin turns this off when their self-check disagrees with the torch code below on the GPU at hand.
KERNELS = True


@dataclass
class Routing:
    """Slots sorted by expert.

    expert:  [S] expert of each sorted row (ascending).
    slot:    [S] slot (``t * K + k``) each sorted row came from.
    token:   [S] token (row of the unsorted input) each sorted row reads.
    counts:  [E] rows per expert; ``ends`` is their inclusive cumulative sum.
    """

    expert: torch.Tensor
    slot: torch.Tensor
    token: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    num_experts: int
    top_k: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.expert.numel()

    @property
    def num_tokens(self) -> int:
        return self.num_rows // self.top_k

    @property
    def starts(self) -> torch.Tensor:
        return self.ends - self.counts

    def inverse(self) -> torch.Tensor:
        """[S] sorted row of each slot: ``rows[inverse()]`` puts sorted rows back in slot order."""
        if "inverse" not in self._cache:
            inv = torch.empty_like(self.slot)
            inv[self.slot.long()] = torch.arange(self.num_rows, device=self.slot.device, dtype=self.slot.dtype)
            self._cache["inverse"] = inv.long()
        return self._cache["inverse"]

    def blocks(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row tiles of ``block_m`` rows that never straddle two experts.

        Returns ``(block_expert, block_start)`` (int32) for a launch grid of
        ``cdiv(S, block_m) + E`` tiles, an upper bound known without a host sync;
        unused tiles have expert ``-1``.
        """
        if block_m not in self._cache:
            if self.ends.is_cuda and KERNELS:
                from .routing_kernels import tile_map

                self._cache[block_m] = tile_map(self.ends, self.num_rows, block_m)
            else:
                self._cache[block_m] = self.blocks_torch(block_m)
        return self._cache[block_m]

    def blocks_torch(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`blocks` as torch ops (not cached): everywhere but CUDA, and the routing kernels' reference."""
        e = self.num_experts
        tiles_per_expert = (self.counts + block_m - 1) // block_m
        tile_ends = tiles_per_expert.cumsum(0)
        n_tiles = triton_cdiv(self.num_rows, block_m) + e
        tile = torch.arange(n_tiles, device=self.expert.device)
        tile_expert = torch.searchsorted(tile_ends, tile, right=True)
        valid = tile_expert < e
        owner = tile_expert.clamp(max=e - 1)
        first_tile = (tile_ends - tiles_per_expert)[owner]
        start = self.starts[owner] + (tile - first_tile) * block_m
        return torch.where(valid, owner, -1).to(torch.int32), start.to(torch.int32)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Group the ``[T, K]`` expert choices by expert (stable, so ties keep slot order)."""
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.is_cuda and KERNELS:  # what follows the sort in one launch
        from .routing_kernels import route_metadata, sort_by_expert

        top_k = top_k_index.size(1)
        metadata = route_metadata(*sort_by_expert(top_k_index.reshape(-1), num_experts), num_experts, top_k)
        return Routing(*metadata, num_experts, top_k)
    return route_torch(top_k_index, num_experts)


def route_torch(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """:func:`route` as torch ops: everywhere but CUDA, and the routing kernels' reference."""
    top_k = top_k_index.size(1)
    flat = top_k_index.reshape(-1)
    expert, slot = torch.sort(flat, stable=True)
    # Group ends from the sorted experts: no host sync (CUDA's bincount asks the host for the input's range,
    # a sync in every MoE layer that serialised the CPU with the GPU: s11c2), and deterministic.
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=expert.dtype)
    ends = torch.searchsorted(expert, bounds, right=False)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return Routing(
        expert=expert.to(torch.int32),
        slot=slot.to(torch.int32),
        token=(slot // top_k).to(torch.int32),
        counts=counts,
        ends=ends,
        num_experts=num_experts,
        top_k=top_k,
    )
