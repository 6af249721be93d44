"""Multipack: batches of balanced token counts, the same work on every rank.

With padding-free rows a step costs what its tokens cost, not ``batch × longest``.
Batching by example count then gives ranks very different amounts of work (one rank
draws long examples, the others wait at the gradient all-reduce). Multipack batches
by tokens instead:

- **Token budget.** Each rank's batch holds at most ``token_budget`` tokens; the
  plugin uses ``per_device_train_batch_size × max_seq_length``, i.e. what a padded
  batch could hold at most. The number of examples per batch varies.
- **Packing.** An epoch's examples are shuffled (seeded by ``seed`` and the epoch) and
  cut into windows of about ``steps_per_window × num_replicas`` batches of tokens.
  Each window is split into the fewest bins that is a multiple of ``num_replicas``
  and can hold its tokens, with longest-processing-time-first: examples by length,
  longest first, each into the currently lightest bin. That needs no more bins than
  first-fit-decreasing and leaves the bins almost equal; if a bin would overflow the
  budget, the window gets ``num_replicas`` more bins and is packed again.
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


def pack_balanced(lengths: Sequence[int], num_bins: int) -> list[list[int]] | None:
    """Split item indices into ``num_bins`` bins of near-equal total length (LPT).

    Returns bins of indices into ``lengths``, or None when there are fewer items than bins.
    """
    if num_bins > len(lengths):
        return None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    heap = [(0, b) for b in range(num_bins)]  # (load, bin), lightest on top
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def _pack_window(lengths: np.ndarray, token_budget: int, num_replicas: int) -> list[list[int]]:
    """Bins (a multiple of num_replicas of them) for one window, each within the budget."""
    total = int(lengths.sum())
    num_bins = num_replicas * max(1, -(-total // (token_budget * num_replicas)))
    as_list = lengths.tolist()
    while True:
        bins = pack_balanced(as_list, num_bins)
        if bins is None:
            raise ValueError(f"cannot split {len(as_list)} examples ({total} tokens) into batches of at most "
                             f"{token_budget} tokens for {num_replicas} ranks; raise the budget")
        if max(sum(as_list[i] for i in b) for b in bins) <= token_budget:
            return bins
        num_bins += num_replicas


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

    def _windows(self, order: np.ndarray) -> list[np.ndarray]:
        """Cut the shuffled order into windows of about steps_per_window steps of tokens."""
        target = self.token_budget * self.num_replicas * self.steps_per_window
        cumulative = np.cumsum(self.lengths[order])
        cuts = np.searchsorted(cumulative, np.arange(target, int(cumulative[-1]), target), side="right")
        windows = [w for w in np.split(order, cuts) if len(w)]
        # a thin last window would give short, underfilled steps (or fewer examples than ranks)
        if len(windows) > 1 and (int(self.lengths[windows[-1]].sum()) < target // 2
                                 or len(windows[-1]) < self.num_replicas):
            windows[-2:] = [np.concatenate(windows[-2:])]
        return windows

    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """The whole epoch for all ranks: ``plan[step][rank]`` is a list of example indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        steps: list[list[list[int]]] = []
        for window in self._windows(order):
            bins = _pack_window(self.lengths[window], self.token_budget, self.num_replicas)
            bins = [[int(window[i]) for i in b] for b in bins]
            bins.sort(key=lambda b: -int(self.lengths[b].sum()))
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
