"""Padding-free collation: a batch of examples becomes one row with no padding at all.

The examples are concatenated into a ``[1, T]`` row. ``position_ids`` restart at 0
for every example, so RoPE sees each example exactly as if it were alone, and the
cumulative sequence lengths (``cu_seq_lens_q/k``, transformers' flash-attention
kwarg names) travel with the batch so the attention never has to recompute them
from the positions with a device-to-host sync in every layer.

The first label of every example is ``-100``: the model shifts labels by one, so
without it the last token of one example would be trained to predict the first
token of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def example_labels(example: dict[str, Any]) -> list[int]:
    """The labels of one tokenised row, in any of the forms TRL or our data loader produce.

    ``labels`` are used as given; otherwise ``completion_mask`` / ``assistant_masks``
    (1 = train on this token) mask the ``input_ids``; otherwise every token is a label.
    """
    ids = list(example["input_ids"])
    if example.get("labels") is not None:
        labels = list(example["labels"])
        if len(labels) != len(ids):
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        return labels
    masks = [example[k] for k in ("completion_mask", "assistant_masks") if example.get(k) is not None]
    return [t if all(m[i] for m in masks) else IGNORE_INDEX for i, t in enumerate(ids)]


def _sequence_lengths(example: dict[str, Any]) -> list[int]:
    """Lengths of the sequences inside one row: one, or several for a row TRL already packed."""
    n = len(example["input_ids"])
    lengths = [int(x) for x in example["seq_lengths"]] if example.get("seq_lengths") is not None else [n]
    if sum(lengths) != n:
        raise ValueError(f"seq_lengths {lengths} do not add up to the row length {n}")
    return lengths


def collate_padding_free(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate tokenised examples into one padding-free row (see the module docstring)."""
    if not examples:
        raise ValueError("padding-free collation needs at least one example")
    input_ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for example in examples:
        ids, lab = list(example["input_ids"]), example_labels(example)
        start = len(input_ids)
        input_ids += ids
        labels += lab
        for n in _sequence_lengths(example):
            if n == 0:
                continue
            labels[start] = IGNORE_INDEX  # never predict across a boundary
            lengths.append(n)
            start += n
    if not lengths:
        raise ValueError("padding-free collation got only empty examples")

    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(seq_lens, 0, out=cu_seq_lens[1:])
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), seq_lens.long())
    position_ids = torch.arange(len(input_ids), dtype=torch.long) - starts
    max_length = int(seq_lens.max())
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long)[None],
        "labels": torch.tensor(labels, dtype=torch.long)[None],
        "position_ids": position_ids[None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


class PaddingFreeCollator:
    """A ``Trainer`` data collator for :func:`collate_padding_free` (a class so it pickles for workers)."""

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_padding_free(examples)

    def __repr__(self) -> str:
        return "PaddingFreeCollator()"
