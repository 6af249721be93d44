"""Shared fixtures for the aadp tests: a tiny random Llama and random tokenised examples."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256


def _tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def _random_examples(lengths, seed: int = 0, prompt_fraction: float = 0.3) -> list[dict]:
    """Rows like our data loader's: ``input_ids`` and ``labels`` with the prompt masked to -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        prompt = int(n * prompt_fraction)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama(seed=0, dtype=torch.float32, device=DEVICE)``."""
    return _tiny_llama


@pytest.fixture
def random_examples():
    """Factory: ``random_examples(lengths, seed=0, prompt_fraction=0.3)``."""
    return _random_examples


@pytest.fixture
def device():
    return DEVICE
