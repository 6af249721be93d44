"""The rule table: every architecture's patched MoE block equals the original one."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_testing import ARCHS, DEVICE, max_diff, tiny_model

from fmsaccel_framework.plugin import PluginError
from fmsaccel_moe.patch import ExpertsSettings, is_patched, patch_site, unpatch_site
from fmsaccel_moe.rules import RULES, find_moe_sites


def test_rule_table_covers_the_spec_architectures():
    from fmsaccel_moe.spec import MOE

    assert set(RULES) == set(MOE.architectures) == set(ARCHS)


def _block_run(site, hidden, grad):
    """Output, router logits and gradients (input and every block parameter) of one MoE block."""
    captured = {}
    router = getattr(site.block, site.rule.router)

    def keep_logits(module, args, output):
        # the logits are the float [tokens, experts] output (its position differs across transformers versions)
        captured["logits"] = next(o for o in output if o.is_floating_point() and o.shape[-1] == router.weight.size(0))

    handle = router.register_forward_hook(keep_logits)
    try:
        x = hidden.clone().requires_grad_()
        out = site.block(x)
        params = [p for _, p in sorted(site.block.named_parameters())]
        grads = torch.autograd.grad(out, [x, *params], grad)
    finally:
        handle.remove()
    return out, captured["logits"], grads


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_patched_block_equals_original(model_type, backend):
    original = tiny_model(model_type)
    patched = copy.deepcopy(original)
    sites, patched_sites = find_moe_sites(original), find_moe_sites(patched)
    assert len(sites) == len(patched_sites) >= 1
    for site in patched_sites:
        assert patch_site(site, ExpertsSettings(backend=backend))
        assert is_patched(site.head)

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, original.config.hidden_size, generator=gen).to(DEVICE)
    grad = torch.randn(2, 9, original.config.hidden_size, generator=gen).to(DEVICE)
    ref_out, ref_logits, ref_grads = _block_run(sites[0], hidden, grad)
    out, logits, grads = _block_run(patched_sites[0], hidden, grad)
    assert max_diff(out, ref_out) < 1e-5
    assert torch.equal(logits, ref_logits)
    for got, want in zip(grads, ref_grads, strict=True):
        assert max_diff(got, want) < 1e-5 * max(1.0, want.abs().max().item())


def test_unpatch_restores_the_original_forward():
    model = tiny_model("mixtral")
    site = find_moe_sites(model)[0]
    patch_site(site, ExpertsSettings(backend="grouped_mm"))
    assert not patch_site(site, ExpertsSettings(backend="grouped_mm"))  # idempotent
    unpatch_site(site)
    assert not is_patched(site.head)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(PluginError, match="no rule for model_type 'llama'"):
        find_moe_sites(model)


def test_unexpected_structure_is_a_clear_error():
    model = tiny_model("qwen3_moe")
    block = find_moe_sites(model)[0].block
    block.experts.down_proj = torch.nn.Parameter(torch.zeros(3, 3, 3))
    with pytest.raises(PluginError, match="disagree"):
        find_moe_sites(model)


def test_non_swiglu_activation_is_refused():
    model = tiny_model("granitemoe", hidden_act="gelu")
    with pytest.raises(PluginError, match="hidden_act='gelu'"):
        find_moe_sites(model)
