"""Shared fixtures for the accelerated-peft tests.

Without CUDA the Triton kernels run under the Triton interpreter, switched on by the repository's
root ``conftest.py`` before any kernel is decorated.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    torch.set_num_threads(1)  # test tensors are tiny: more OpenMP threads only contend (100x slower on a busy CPU)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_gptq(in_features: int, out_features: int, group_size: int = 32, act_order: bool = False,
                 checkpoint_format: str = "gptq", seed: int = 0, device: str = DEVICE) -> dict:
    """Random packed GPTQ tensors, plus the reference weight ``W [out, in]`` (fp32) they encode."""
    from fmsaccel_peft.gptq import packing

    g = torch.Generator().manual_seed(seed)
    groups = packing.num_groups(in_features, group_size)
    intweight = torch.randint(0, 16, (out_features, in_features), generator=g)
    zeros = torch.randint(1, 16, (groups, out_features), generator=g)
    scales = (torch.rand(groups, out_features, generator=g) * 0.02 + 0.002).half()
    g_idx = packing.sequential_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=g)]
    tensors = packing.pack(intweight, zeros, scales, g_idx, checkpoint_format)
    reference = (intweight - zeros[g_idx.long()].t()).float() * scales[g_idx.long()].t().float()
    return {**{k: v.to(device) for k, v in tensors.items()}, "reference": reference.to(device),
            "group_size": group_size, "zero_offset": packing.zero_offset(checkpoint_format),
            "act_order": act_order}


@pytest.fixture
def random_gptq():
    """Factory: ``random_gptq(in_features, out_features, group_size=32, act_order=False, checkpoint_format="gptq")``."""
    return _random_gptq


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A random bf16 two-layer Llama saved as a normal checkpoint folder (the loaders' input)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-fp"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path
