"""FP8 base matmuls: the row quantiser against its torch reference, the matmuls against fp32 (e4m3's error)."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE

from fmsaccel_foak.ops import fp8


@pytest.mark.parametrize("shape", [(37, 136), (5, 2050), (1, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None]).to(DEVICE, dtype)
    q, scale = fp8.quantize_rows(x)
    q_ref, scale_ref = fp8.quantize_rows_reference(x)
    assert q.dtype == fp8.E4M3 and q.shape == x.shape and scale.shape == (shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), q_ref.float())  # round to nearest, ties to even, like torch's cast
    assert (q.float().abs().amax(dim=1) == fp8.E4M3_MAX).all()  # each row's largest value maps to 448 exactly
    torch.testing.assert_close(q.float() * scale, x.float(), rtol=2**-4, atol=1e-30)


def test_linear_and_input_grad_have_e4m3_error():
    torch.manual_seed(0)
    x = torch.randn(45, 96, device=DEVICE, dtype=torch.bfloat16)  # rows not a multiple of 16: padded inside
    w = torch.randn(48, 96, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(45, 48, device=DEVICE, dtype=torch.bfloat16)
    y = fp8.linear(fp8.QuantizedInput(x), w, torch.bfloat16)
    dx = fp8.input_grad(dy, w, torch.bfloat16)
    assert y.shape == (45, 48) and dx.shape == (45, 96) and y.dtype == dx.dtype == torch.bfloat16
    for got, want in ((y, x.float() @ w.float().t()), (dx, dy.float() @ w.float())):
        error = ((got.float() - want).norm() / want.norm()).item()
        assert 0.005 < error < 0.06, error  # e4m3 on both operands: a few per cent, never exact


def test_applies_only_where_it_pays(monkeypatch):
    x = torch.zeros(fp8.MIN_ROWS, 64, dtype=torch.bfloat16)
    assert fp8.applies(x)
    assert not fp8.applies(x[:-1])  # too few tokens
    assert not fp8.applies(torch.zeros(fp8.MIN_ROWS, 60, dtype=torch.bfloat16))  # width not a multiple of 16


def test_fp8_matmul_needs_fused_lora():
    from foak_testing import build_plugin

    from fmsaccel_framework.plugin import PluginError

    with pytest.raises(PluginError, match="fp8_matmul runs the fused LoRA op's base matmuls in FP8: it needs "
                                          "fused_lora: true"):
        build_plugin("peft.quantization.fused_ops_and_kernels", fp8_matmul=True, fast_rms_layernorm=True)
