"""The vocab-parallel loss of FSDP runs (lm_head rows split across ranks) equals the full-vocabulary op."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp
import vocab_parallel_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_full_vocabulary_forward_and_backward():
    """Log-probs, entropy, top-1, the hidden-state gradient, embedding lookups (uneven vocabulary split), and
    which tables foak splits under FSDP."""
    mp.spawn(vocab_parallel_worker.check, args=(2, _free_port()), nprocs=2)
