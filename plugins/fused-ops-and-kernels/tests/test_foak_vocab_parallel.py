"""The vocab-parallel loss of FSDP runs (lm_head rows split across ranks) equals the full-vocabulary op."""

from __future__ import annotations

import torch.multiprocessing as mp
import vocab_parallel_worker


def test_two_ranks_match_full_vocabulary_forward_and_backward(tmp_path):
    """Log-probs, entropy, top-1, the hidden-state gradient, embedding lookups (uneven vocabulary split), and
    which tables foak splits under FSDP."""
    mp.spawn(vocab_parallel_worker.check, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
