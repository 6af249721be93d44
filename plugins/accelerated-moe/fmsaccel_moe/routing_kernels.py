"""The routing metadata in two Triton launches instead of about thirty small torch ops.

An R step is paced by the host: each MoE layer's routing (group ends, the int32 copies the
kernels read, the tile map) cost about 30 torch launches in the forward and 17 in the backward,
some 20 us of CPU each (s12c1 profile: the experts' custom ops took 2 ms of CPU per call).
:func:`route_metadata` does what follows the sort in one launch, :func:`tile_map` the tile map in
another. ``routing.py`` uses them for CUDA tensors and keeps its torch code, the reference the
tests compare these with (under Triton's interpreter on the CPU), for everything else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 32


@triton.jit(do_not_specialize=["rows"])
def _route_kernel(sorted_ptr, order_ptr, expert_ptr, slot_ptr, token_ptr, ends_ptr, previous_ptr, rows, num_experts,
                  top_k, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < rows
    expert = tl.load(sorted_ptr + offs, mask=valid, other=0)
    order = tl.load(order_ptr + offs, mask=valid, other=0)
    tl.store(expert_ptr + offs, expert.to(tl.int32), mask=valid)
    tl.store(slot_ptr + offs, order.to(tl.int32), mask=valid)
    tl.store(token_ptr + offs, (order // top_k).to(tl.int32), mask=valid)
    # group ends: ends[x] = i + 1 for every expert x with expert[i] <= x < expert[i + 1] (the last row runs to E);
    # each x is met at exactly one row, so no two programs write the same end
    following = tl.load(sorted_ptr + offs + 1, mask=offs + 1 < rows, other=num_experts)
    experts = tl.arange(0, BLOCK_E)
    hit = (expert[:, None] <= experts[None, :]) & (experts[None, :] < following[:, None]) & valid[:, None]
    end = tl.sum(tl.where(hit, (offs + 1)[:, None], 0), axis=0)
    met = (tl.max(hit.to(tl.int32), axis=0) > 0) & (experts < num_experts)
    tl.store(ends_ptr + experts, end.to(tl.int64), mask=met)
    tl.store(previous_ptr + experts + 1, end.to(tl.int64), mask=met & (experts + 1 < num_experts))  # for the counts
    if pid == 0:  # experts before the first chosen one end at row 0
        first = tl.load(sorted_ptr)
        before = (experts < first) & (experts < num_experts)
        zeros = tl.zeros((BLOCK_E,), dtype=tl.int64)
        tl.store(ends_ptr + experts, zeros, mask=before)
        tl.store(previous_ptr + experts + 1, zeros, mask=before & (experts + 1 < num_experts))
        tl.store(previous_ptr + experts, zeros, mask=experts == 0)


def sort_by_expert(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable sort of the flat expert choices, on one-byte keys where they fit: one radix pass instead of eight
    for int64 keys."""
    return torch.sort(flat.to(torch.uint8 if num_experts < 256 else torch.int32), stable=True)


def route_metadata(sorted_expert: torch.Tensor, order: torch.Tensor, num_experts: int, top_k: int):
    """From ``torch.sort``'s values and indices: ``(expert, slot, token)`` int32 and ``(counts, ends)`` int64."""
    rows = sorted_expert.numel()
    expert, slot, token = (torch.empty(rows, dtype=torch.int32, device=order.device) for _ in range(3))
    if not rows:
        zeros = torch.zeros(num_experts, dtype=torch.int64, device=order.device)
        return expert, slot, token, zeros, zeros.clone()
    # ends and the ends shifted by one expert, each its own allocation: a view at an offset would be another pointer
    # alignment, another specialisation of every kernel reading `ends` (compiled and autotuned mid-run, as in s12c1)
    ends, previous = (torch.empty(num_experts, dtype=torch.int64, device=order.device) for _ in range(2))
    _route_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        sorted_expert, order, expert, slot, token, ends, previous, rows, num_experts, top_k,
        BLOCK=ROWS_PER_PROGRAM, BLOCK_E=triton.next_power_of_2(num_experts))
    return expert, slot, token, ends - previous, ends


@triton.jit(do_not_specialize=["n_tiles"])
def _tile_map_kernel(ends_ptr, block_expert_ptr, block_start_ptr, num_experts, n_tiles,
                     BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts
    ends = tl.load(ends_ptr + experts, mask=real, other=0)
    starts = tl.load(ends_ptr + experts - 1, mask=real & (experts > 0), other=0)
    counts = tl.where(real, ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    for t0 in range(0, n_tiles, BLOCK_T):
        tile = t0 + tl.arange(0, BLOCK_T)
        # owner: how many experts' tiles end at or before this one (searchsorted, right)
        owner = tl.sum(((tile_ends[None, :] <= tile[:, None]) & real[None, :]).to(tl.int32), axis=1)
        clamped = tl.minimum(owner, num_experts - 1)  # spare tiles: the last expert's numbers, expert -1
        below = experts[None, :] < clamped[:, None]
        first_tile = tl.sum(tl.where(below, tiles[None, :], 0), axis=1)
        first_row = tl.sum(tl.where(below, counts[None, :], 0), axis=1)
        start = first_row + (tile - first_tile) * BLOCK_M
        inside = tile < n_tiles
        tl.store(block_expert_ptr + tile, tl.where(owner < num_experts, owner, -1).to(tl.int32), mask=inside)
        tl.store(block_start_ptr + tile, start.to(tl.int32), mask=inside)


def tile_map(ends: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Routing.blocks`` in one launch: ``(block_expert, block_start)`` for ``cdiv(rows, block_m) + E`` tiles."""
    num_experts = ends.numel()
    n_tiles = triton.cdiv(num_rows, block_m) + num_experts
    block_expert = torch.empty(n_tiles, dtype=torch.int32, device=ends.device)
    block_start = torch.empty(n_tiles, dtype=torch.int32, device=ends.device)
    _tile_map_kernel[(1,)](ends, block_expert, block_start, num_experts, n_tiles, BLOCK_M=block_m,
                           BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_T=128)
    return block_expert, block_start


def agrees_with_torch(device: torch.device, num_experts: int, top_k: int) -> bool:
    """Whether these kernels give the torch code's routing on ``device`` (checked once before training, so a GPU or
    Triton version they do not suit falls back to torch instead of training on a wrong tile map)."""
    from .routing import route_torch

    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(997, num_experts, device=device, generator=gen)
    scores[:, num_experts // 2] = -1.0  # an empty group
    index = scores.topk(min(top_k, num_experts - 1), dim=-1).indices
    want = route_torch(index, num_experts)
    want_tiles = [want.blocks_torch(block_m) for block_m in (64, 128)]
    got = route_metadata(*sort_by_expert(index.reshape(-1), num_experts), num_experts, index.size(1))
    got_tiles = [tile_map(got[4], want.num_rows, block_m) for block_m in (64, 128)]
    want_all = [want.expert, want.slot, want.token, want.counts, want.ends, *want_tiles[0], *want_tiles[1]]
    got_all = [*got, *got_tiles[0], *got_tiles[1]]
    return all(torch.equal(g, w) for g, w in zip(got_all, want_all, strict=True))
