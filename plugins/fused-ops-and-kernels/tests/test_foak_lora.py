"""The fused LoRA op against PEFT's own LoRA layers, for every base layer kind, with dropout."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE, QUANTIZE
from peft import LoraConfig, get_peft_model
from torch import nn

from fmsaccel_foak.ops import fused_lora
from fmsaccel_foak.ops.lora import dropout_mask


class Block(nn.Module):
    """q/k/v read the same input (fused together), o reads another; q and v have biases."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(64, 64, bias=True), nn.Linear(64, 32, bias=False)
        self.v_proj, self.o_proj = nn.Linear(64, 32, bias=True), nn.Linear(64, 64, bias=False)

    def forward(self, x, h):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(h)


class _SameMaskDropout(nn.Dropout):
    def forward(self, x):
        mask = dropout_mask(x.reshape(-1, x.shape[-1]), self.p).view_as(x)
        return x * mask / (1.0 - self.p)


def _peft_block(base_layer, dropout, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    torch.manual_seed(0)
    block = Block().to(DEVICE)
    convert = QUANTIZE[base_layer]
    if convert is not None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block, name, convert(getattr(block, name)))
    model = get_peft_model(block, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets)))
    if dropout:  # PEFT's dropout, drawing its masks exactly as the fused op does (same RNG calls, same order)
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = _SameMaskDropout(dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a random B tests the full backward
            nn.init.normal_(p, std=0.1)
    return model.train()


def _run(model, fused: bool, keep_weights: bool = False):
    inner = model.base_model.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g).to(DEVICE).requires_grad_()
    h = torch.randn(2, 5, 64, generator=g).to(DEVICE).requires_grad_()
    seeds = [torch.randn(2, 5, n, generator=g).to(DEVICE) for n in (64, 32, 32, 64)]
    model.zero_grad()
    torch.manual_seed(7)  # same dropout masks on both paths (see _SameMaskDropout)
    if fused:
        q, k, v = fused_lora(x, [inner.q_proj, inner.k_proj, inner.v_proj], keep_weights)
        (o,) = fused_lora(h, [inner.o_proj], keep_weights)
    else:
        q, k, v, o = inner(x, h)
    sum((t * s).sum() for t, s in zip((q, k, v, o), seeds, strict=True)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return [q, k, v, o], x.grad, h.grad, grads


@pytest.mark.parametrize("base_layer", ["bitsandbytes", "auto_gptq", None])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("keep_weights", [False, True])
def test_fused_lora_matches_peft(base_layer, dropout, keep_weights):
    model = _peft_block(base_layer, dropout)
    want_out, want_dx, want_dh, want_grads = _run(model, fused=False)
    got_out, got_dx, got_dh, got_grads = _run(model, fused=True, keep_weights=keep_weights)
    for got, want in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dx, want_dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dh, want_dh, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 8
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_lora_mixes_lora_and_bare_base_layers():
    """Projections without LoRA (here k and o) go through the same op: base matmul only, input gradient kept."""
    model = _peft_block("bitsandbytes", 0.1, targets=("q_proj", "v_proj"))
    want_out, want_dx, want_dh, want_grads = _run(model, fused=False)
    got_out, got_dx, got_dh, got_grads = _run(model, fused=True)
    for got, want in zip([*got_out, got_dx, got_dh], [*want_out, want_dx, want_dh], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_lora_bf16_under_autocast():
    """Under autocast the op runs its matmuls in the autocast dtype, like PEFT's layers do."""
    if DEVICE == "cpu" and not hasattr(torch, "get_autocast_dtype"):
        pytest.skip("torch without get_autocast_dtype")
    model = _peft_block(None, 0.0)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        want_out, want_dx, _, want_grads = _run(model, fused=False)
        got_out, got_dx, _, got_grads = _run(model, fused=True)
    for got, want in zip([*got_out, got_dx], [*want_out, want_dx], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=3e-2, rtol=3e-2, msg=name)


def test_fused_lora_rejects_a_trainable_base():
    block = Block().to(DEVICE)
    with pytest.raises(ValueError, match="frozen base layer"):
        fused_lora(torch.randn(1, 64, device=DEVICE), [block.q_proj])
