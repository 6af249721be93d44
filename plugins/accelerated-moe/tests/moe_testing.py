"""Tiny random MoE models of every supported architecture, and comparison helpers."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Triton needs CUDA tensors on a GPU machine; without one the interpreter runs on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
)
EXPERTS = dict(intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
QWEN = dict(intermediate_size=40, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2, decoder_sparse_step=1)

ARCHS: dict[str, dict] = {
    "mixtral": dict(EXPERTS),
    "granitemoe": dict(EXPERTS),
    "granitemoeshared": dict(EXPERTS, shared_intermediate_size=16),
    "granitemoehybrid": dict(
        EXPERTS,
        shared_intermediate_size=16,
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_chunk_size=16,
    ),
    "qwen2_moe": dict(QWEN, shared_expert_intermediate_size=16, norm_topk_prob=False),
    "qwen3_moe": dict(QWEN, head_dim=8, norm_topk_prob=True),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**COMMON, **ARCHS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, device=None, **overrides):
    """A random-init model whose experts use Hugging Face's plain per-expert loop (the reference)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    with torch.no_grad():  # HF initialises expert weights to zero-ish scales on some archs; make them matter
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("gate.weight"):
                p.normal_(0.0, 0.2)
    return model.to(device or DEVICE)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
