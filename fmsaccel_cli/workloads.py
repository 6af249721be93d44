"""Synthetic benchmark workloads: pre-tokenised rows, no downloads, deterministic for a seed.

Two shapes stress the two things the recipes accelerate:

- ``P``: every example is exactly ``max_length`` (4096) tokens. Compute-bound; nothing to pad, so it measures
  the kernels (fused LoRA, RMSNorm, RoPE, SwiGLU, loss) on long sequences.
- ``R``: lengths drawn from a lognormal (mu 5.4, sigma 0.6 in log space) clipped to [32, 2048], mean about 269
  tokens, like an instruction-tuning set. The baseline pads every batch to its longest row, so this measures what
  padding-free and multipack recover.

Token ids are uniform in ``[FIRST_TOKEN_ID, vocab_size)``, which skips the shipped tokenizer's special tokens
(bos/eos/pad are 0..2) so no random token masquerades as padding. Labels equal input_ids: every token is trained on.
The stdlib ``random`` generator is used because its streams are stable across Python and numpy versions.
"""

from __future__ import annotations

import random

WORKLOAD_PREFIX = "workload:"
FIRST_TOKEN_ID = 3
R_LOG_MEAN, R_LOG_SIGMA = 5.4, 0.6
R_MIN_LENGTH, R_MAX_LENGTH = 32, 2048

WORKLOADS = {
    "P": "every example exactly max_length (4096) tokens",
    "R": f"lognormal lengths (mu {R_LOG_MEAN}, sigma {R_LOG_SIGMA}) clipped to [{R_MIN_LENGTH}, {R_MAX_LENGTH}]",
}


def workload_name(data_path: str | None) -> str | None:
    """``"workload:R"`` -> ``"R"``; any other data path -> None (a real dataset)."""
    if data_path and str(data_path).startswith(WORKLOAD_PREFIX):
        return str(data_path)[len(WORKLOAD_PREFIX) :]
    return None


def workload_lengths(name: str, num_examples: int, seed: int = 42, max_length: int = 4096) -> list[int]:
    """The sequence length of each example of workload ``name`` (drawn first, so lengths don't depend on vocab)."""
    key = name.upper().removeprefix(WORKLOAD_PREFIX.upper())
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    if max_length < 1 or num_examples < 0:
        raise ValueError(f"need max_length >= 1 and num_examples >= 0, got {max_length} and {num_examples}")
    if key == "P":
        return [max_length] * num_examples
    rng = random.Random(f"lengths-{seed}")
    high = min(R_MAX_LENGTH, max_length)
    low = min(R_MIN_LENGTH, high)
    return [min(high, max(low, round(rng.lognormvariate(R_LOG_MEAN, R_LOG_SIGMA)))) for _ in range(num_examples)]


def build_workload(name: str, vocab_size: int, num_examples: int, seed: int = 42, max_length: int = 4096) -> list[dict]:
    """Rows ``{"input_ids": [...], "labels": [...]}`` of workload ``name``: "P" or "R" (or "workload:P")."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}, got {vocab_size}")
    lengths = workload_lengths(name, num_examples, seed=seed, max_length=max_length)
    rng = random.Random(f"tokens-{seed}")
    token_ids = range(FIRST_TOKEN_ID, vocab_size)
    rows = []
    for length in lengths:
        ids = rng.choices(token_ids, k=length)
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows
