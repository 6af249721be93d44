"""Padding-free collation: a batch of examples becomes one row with no padding at all.

The examples are concatenated into a ``[1, T]`` row. ``position_ids`` restart at 0
for every example, so RoPE sees each example exactly as if it were alone, and the
cumulative sequence lengths (``cu_seq_lens_q/k``, transformers' flash-attention
kwarg names) travel with the batch so the attention never has to recompute them
from the positions with a device-to-host sync in every layer.

The first label of every example is ``-100``: the model shifts labels by one, so
without it the last token of one example would be trained to predict the first
token of the next.

Length buckets (``bucket_lengths``): every new row length is a new shape, and a CUDA
graph is recorded per shape. Bucketed rows are padded with filler examples (token 0,
labels ``-100``, their own boundaries, so no real token attends to them) up to the
next length of a fixed ladder, with a fixed multiple of boundaries and
``max_length_q`` set to the row length: a handful of shapes serve a whole run.
``num_padding_tokens`` tells the token counter how many tokens are filler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
BUCKET_STEPS = 4  # bucket lengths per doubling: a long row gets at most about 21 % filler (10 % on average)
BUCKET_ALIGN = 64  # bucket lengths are multiples of this (tile-friendly matmul shapes)
DOC_MULTIPLE = 8  # bucketed rows have a multiple of this many examples, filler included


def bucket_length(tokens: int) -> int:
    """The smallest ladder length >= ``tokens``: ``BUCKET_STEPS`` per doubling, rounded to ``BUCKET_ALIGN``."""
    step = 0
    while True:
        length = round(2 ** (step / BUCKET_STEPS)) * BUCKET_ALIGN
        if length >= tokens:
            return length
        step += 1


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


def _filler_lengths(tokens: int, examples: int) -> list[int]:
    """Filler examples that bring a row of ``tokens`` and ``examples`` to its bucket (at least one, none empty)."""
    count = DOC_MULTIPLE - examples % DOC_MULTIPLE
    filler = bucket_length(tokens + count) - tokens
    return [1] * (count - 1) + [filler - (count - 1)]


def collate_padding_free(examples: Sequence[dict[str, Any]], bucket_lengths: bool = False) -> dict[str, Any]:
    """Concatenate tokenised examples into one padding-free row (see the module docstring).

    ``bucket_lengths``: pad the row with filler examples to a ladder length (for CUDA graphs).
    """
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
    padding = 0
    if bucket_lengths:
        real = len(input_ids)
        lengths += _filler_lengths(real, len(lengths))
        padding = sum(lengths) - real
        input_ids += [0] * padding
        labels += [IGNORE_INDEX] * padding

    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(seq_lens, 0, out=cu_seq_lens[1:])
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), seq_lens.long())
    position_ids = torch.arange(len(input_ids), dtype=torch.long) - starts
    max_length = len(input_ids) if bucket_lengths else int(seq_lens.max())  # an upper bound, fixed per bucket
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long)[None],
        "labels": torch.tensor(labels, dtype=torch.long)[None],
        "position_ids": position_ids[None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
    if bucket_lengths:
        batch["num_padding_tokens"] = padding  # the token counter removes it before the model's forward
    return batch


class PaddingFreeCollator:
    """A ``Trainer`` data collator for :func:`collate_padding_free` (a class so it pickles for workers)."""

    def __init__(self, bucket_lengths: bool = False):
        self.bucket_lengths = bucket_lengths

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_padding_free(examples, self.bucket_lengths)

    def __repr__(self) -> str:
        return f"PaddingFreeCollator(bucket_lengths={self.bucket_lengths})"
