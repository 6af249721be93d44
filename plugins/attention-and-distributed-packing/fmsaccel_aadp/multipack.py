"""Multipack: batches of balanced token counts, the same work on every rank.

With padding-free rows a step costs what its tokens cost, not ``batch × longest``.
Batching by example count then gives ranks very different amounts of work (one rank
draws long examples, the others wait at the gradient all-reduce). Multipack batches
by tokens instead:

- **Token budget.** Each rank's batch holds at most ``token_budget`` tokens; the
  plugin uses ``per_device_train_batch_size × max_seq_length``, i.e. what a padded
  batch could hold at most. The number of examples per batch varies.
- **Packing.** An epoch's examples are shuffled (seeded by ``seed`` and the epoch) and
  taken in windows of ``steps_per_window × num_replicas`` bins. A window takes examples
  until it holds a little more than its bins can, then packs them
  longest-processing-time-first: longest example first, each into the currently
  lightest bin, skipping those that fit nowhere, which move on to the next window. The
  bins come out nearly full and nearly equal (at least as few bins as
  first-fit-decreasing). The epoch's last window is packed into the fewest bins (a
  multiple of ``num_replicas``) that hold all its examples.
- **Ranks.** A window's bins, heaviest first, are dealt to the ranks ``num_replicas``
  at a time, so the ranks of one step hold bins of nearly the same load. Every
  example is used exactly once per epoch (no drop, no duplication), every rank gets
  the same number of batches, and every rank computes the same plan without talking
  to the others.

Pure Python + numpy; torch is touched only to read the rank from torch.distributed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np


def pack_balanced(lengths: Sequence[int], num_bins: int,
                  capacity: int | None = None) -> tuple[list[list[int]], list[int]] | None:
    """Longest-processing-time-first: items by length, longest first, each into the lightest bin.

    Returns (bins of indices into ``lengths``, indices that fit nowhere within ``capacity``),
    or None when there are fewer items than bins (some bin would stay empty).
    """
    if num_bins > len(lengths):
        return None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    heap = [(0, b) for b in range(num_bins)]  # (load, bin), lightest on top
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    left_over: list[int] = []
    for i in order:
        load, b = heap[0]
        if capacity is not None and load + lengths[i] > capacity:
            left_over.append(i)  # the lightest bin cannot take it, so none can
            continue
        bins[b].append(i)
        heapq.heapreplace(heap, (load + lengths[i], b))
    return bins, left_over


def _dist_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1, 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class MultipackBatchSampler:
    """A ``DataLoader`` batch sampler yielding this rank's token-balanced batches (see the module docstring).

    ``num_replicas`` and ``rank`` default to torch.distributed's when it is
    initialised, else 1 and 0. Call ``set_epoch`` each epoch for a new order.
    """

    def __init__(self, lengths: Sequence[int], token_budget: int, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, shuffle: bool = True, steps_per_window: int = 8):
        world, world_rank = _dist_world()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = world_rank if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.token_budget = int(token_budget)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("multipack needs a non-empty list of example lengths")
        if (self.lengths <= 0).any():
            raise ValueError(f"{int((self.lengths <= 0).sum())} examples are empty; drop them before packing")
        longest = int(self.lengths.max())
        if longest > self.token_budget:
            raise ValueError(f"an example has {longest} tokens, more than the token budget {self.token_budget}; "
                             "truncate to max_seq_length first")
        if len(self.lengths) < self.num_replicas:
            raise ValueError(f"{len(self.lengths)} examples cannot give {self.num_replicas} ranks a batch each")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.steps_per_window = max(1, int(steps_per_window))
        self.epoch = 0
        self._plans: dict[int, list[list[list[int]]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _bins_for_last_window(self, window: list[int]) -> list[list[int]]:
        """The fewest bins (a multiple of num_replicas) that hold all of ``window`` within the budget."""
        lengths = self.lengths[window].tolist()
        total = sum(lengths)
        num_bins = self.num_replicas * max(1, -(-total // (self.token_budget * self.num_replicas)))
        while True:
            packed = pack_balanced(lengths, num_bins, self.token_budget)
            if packed is None:
                raise ValueError(f"cannot split the last {len(window)} examples ({total} tokens) into batches of at "
                                 f"most {self.token_budget} tokens for {self.num_replicas} ranks; raise the budget")
            bins, left_over = packed
            if not left_over:
                return [[window[i] for i in b] for b in bins]
            num_bins += self.num_replicas

    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """The whole epoch for all ranks: ``plan[step][rank]`` is a list of example indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        order = (rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))).tolist()
        lengths = self.lengths.tolist()
        window_bins = self.num_replicas * self.steps_per_window
        capacity = window_bins * self.token_budget
        remaining = int(self.lengths.sum())
        steps: list[list[list[int]]] = []
        carry: list[int] = []
        position = 0
        while position < len(order) or carry:
            window, tokens = carry, sum(lengths[i] for i in carry)
            if remaining + tokens <= capacity * 3 // 2:  # the rest makes the last window, never a thin one
                window, position = window + order[position:], len(order)
                bins, carry = self._bins_for_last_window(window), []
            else:
                while position < len(order) and tokens < capacity:  # overfill: the bins fill up, a few carry on
                    window.append(order[position])
                    tokens += lengths[order[position]]
                    remaining -= lengths[order[position]]
                    position += 1
                packed, left_over = pack_balanced([lengths[i] for i in window], window_bins, self.token_budget)
                bins, carry = [[window[i] for i in b] for b in packed], [window[i] for i in left_over]
            bins.sort(key=lambda b: -sum(lengths[i] for i in b))
            window_steps = [bins[s:s + self.num_replicas] for s in range(0, len(bins), self.num_replicas)]
            if self.shuffle:
                window_steps = [window_steps[i] for i in rng.permutation(len(window_steps))]
            steps += window_steps
        self._plans = {epoch: steps}  # keep one epoch: plans of big datasets are not small
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.plan():
            yield step[self.rank]

    def __len__(self) -> int:
        return len(self.plan())
