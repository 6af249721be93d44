"""GPTQ Triton kernels (the Triton interpreter on a CPU) and QuantLinear against a plain-torch reference."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fmsaccel_peft.gptq import QuantLinear, dequantize, gptq_matmul, kernels, linear

# (in_features, out_features, group_size, act_order, checkpoint format): odd sizes on purpose
CASES = [
    (136, 72, 32, False, "gptq"),  # in_features not a multiple of the tile
    (128, 64, 64, True, "gptq_v2"),  # act-order g_idx
    (96, 40, -1, False, "gptq"),  # one group
    (256, 48, 128, True, "gptq"),
    (136, 24, -1, False, "gptq_v2"),  # one group spanning a partial tile: per-row group lookup
]
IDS = [f"{k}x{n}-g{g}{'-act' if a else ''}-{f}" for k, n, g, a, f in CASES]
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}  # relative to the largest |value|


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    assert actual.dtype == dtype
    err = (actual.float() - expected).abs().max() / expected.abs().max()
    assert err < TOL[dtype], f"max error {err:.2e} relative to the largest value"


def _weight_args(w):
    return (w["qweight"], w["scales"], w["qzeros"], w["g_idx"] if w["act_order"] else None), dict(
        group_size=w["group_size"], zero_offset=w["zero_offset"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dequantize_matches_reference(case, random_gptq):
    w = random_gptq(*case[:2], group_size=case[2], act_order=case[3], checkpoint_format=case[4])
    tensors, kwargs = _weight_args(w)
    out = dequantize(*tensors, **kwargs, dtype=torch.float32)
    assert out.shape == (case[1], case[0])
    torch.testing.assert_close(out, w["reference"], rtol=0, atol=0)
    # passing the full g_idx (act-order or not) takes the per-row path and must agree
    full = dequantize(w["qweight"], w["scales"], w["qzeros"], w["g_idx"], zero_offset=w["zero_offset"],
                      dtype=torch.bfloat16)
    # within one bf16 step (the interpreter truncates fp32 -> bf16 where a GPU rounds)
    torch.testing.assert_close(full.float(), w["reference"], rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_forward_and_grad_input(case, dtype, random_gptq, device):
    in_features, out_features = case[:2]
    w = random_gptq(in_features, out_features, group_size=case[2], act_order=case[3], checkpoint_format=case[4])
    tensors, kwargs = _weight_args(w)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(37, in_features, generator=g, device=device).to(dtype)
    dy = torch.randn(37, out_features, generator=g, device=device).to(dtype)

    y = kernels.fused_matmul(x, *tensors, **kwargs)
    dx = kernels.fused_matmul_grad_input(dy, *tensors, **kwargs)

    _assert_close(y, x.float() @ w["reference"].t(), dtype)
    _assert_close(dx, dy.float() @ w["reference"], dtype)


@pytest.mark.parametrize("backend", ["fused", "dequant", "torch"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=IDS[:2])
def test_autograd_op_forward_backward(case, backend, random_gptq, device):
    """``gptq_matmul`` on a 3-D input: output and input gradient as the reference linear's."""
    in_features, out_features = case[:2]
    w = random_gptq(in_features, out_features, group_size=case[2], act_order=case[3], checkpoint_format=case[4])
    tensors, kwargs = _weight_args(w)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 19, in_features, generator=g, device=device).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(2, 19, out_features, generator=g, device=device).to(torch.bfloat16)

    y = gptq_matmul(x, *tensors, **kwargs, backend=backend)
    (y.float() * dy.float()).sum().backward()

    x_ref = x.detach().float().requires_grad_()
    y_ref = x_ref @ w["reference"].t()
    (y_ref * dy.float()).sum().backward()
    assert y.shape == (2, 19, out_features) and x.grad.shape == x.shape
    _assert_close(y, y_ref.detach(), torch.bfloat16)
    _assert_close(x.grad, x_ref.grad, torch.bfloat16)
    assert w["qweight"].grad is None


def test_checkpoint_recompute_skips_a_last_matmul_that_saves_nothing(random_gptq, monkeypatch):
    """The op saves no tensor, so non-reentrant checkpointing's early-stopping recompute does not rerun a final
    quantised matmul (the down projection of an MLP without LoRA): two products in the forward, one recomputed,
    two in the backward; the gradients are those of the run without checkpointing."""
    w = random_gptq(128, 64, group_size=64, act_order=False, checkpoint_format="gptq")
    tensors, kwargs = _weight_args(w)
    first = torch.randn(128, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def block(x):
        return gptq_matmul(torch.nn.functional.silu(x @ first).repeat(1, 4), *tensors, **kwargs, backend="torch")

    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("the op saved a tensor"), lambda t: t):
        gptq_matmul(torch.randn(3, 128, requires_grad=True), *tensors, **kwargs, backend="torch")
    calls = []
    product = kernels._product
    monkeypatch.setattr(kernels, "_product", lambda *a, **k: calls.append(k["grad_input"]) or product(*a, **k))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointed in (False, True):
        calls.clear()
        x_ = x.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(block, x_, use_reentrant=False) if checkpointed else block(x_)
        y.square().sum().backward()
        grads.append((x_.grad, first.grad.clone()))
        first.grad = None
        assert calls == [False, True], calls  # the forward's product, then the input gradient's: no recompute
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_auto_backend_by_token_count():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels.resolve_backend("auto", kernels.FUSED_MAX_TOKENS, cuda) == "fused"
    assert kernels.resolve_backend("auto", kernels.FUSED_MAX_TOKENS + 1, cuda) == "dequant"
    assert kernels.resolve_backend("auto", 4096, cpu) == "torch"
    assert kernels.resolve_backend("fused", 4096, cpu) == "fused"
    with pytest.raises(ValueError, match="unknown GPTQ backend 'marlin'"):
        kernels.resolve_backend("marlin", 1, cpu)


def _quant_linear(w, bias=None, backend="auto"):
    return QuantLinear(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], bias, group_size=w["group_size"],
                       zero_offset=w["zero_offset"], backend=backend)


def test_quant_linear_cpu_path_warns_once(random_gptq, caplog, monkeypatch):
    monkeypatch.setattr(linear, "_warned_cpu", False)
    w = random_gptq(136, 72, group_size=32, act_order=True, device="cpu")
    bias = torch.randn(72)
    layer = _quant_linear(w, bias)
    assert layer.act_order and layer.weight is None and isinstance(layer, nn.Linear)
    x = torch.randn(3, 5, 136, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger=linear.__name__):
        y = layer(x)
        layer(x)
    assert sum("Triton kernels need CUDA" in r.message for r in caplog.records) == 1
    y.sum().backward()
    torch.testing.assert_close(y, x @ w["reference"].t() + bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, w["reference"].sum(0).expand(3, 5, 136), rtol=1e-4, atol=1e-4)
    assert layer.bias.grad is None
    torch.testing.assert_close(layer.dequantize(torch.float32), w["reference"], rtol=0, atol=0)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_storage_keeps_the_bytes_and_the_output(random_gptq, storage):
    """FSDP shards parameters of its dtype only: the packed tensors become such parameters, bytes unchanged."""
    w = random_gptq(136, 72, group_size=32, act_order=True, device="cpu")
    layer = _quant_linear(w)
    x = torch.randn(4, 136)
    before = layer(x)
    layer.use_float_storage(storage)
    params = dict(layer.named_parameters())
    assert set(params) == set(QuantLinear.PACKED) and not dict(layer.named_buffers())
    assert all(p.dtype == storage and not p.requires_grad for p in params.values())
    for name in QuantLinear.PACKED:
        assert torch.equal(layer._packed(name), w[name].to(layer._packed(name).dtype))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantize(torch.float32), w["reference"], rtol=0, atol=0)


def test_quant_linear_rejects_inconsistent_tensors(random_gptq):
    w = random_gptq(64, 32, group_size=32, device="cpu")
    with pytest.raises(ValueError, match="scales has shape"):
        QuantLinear(w["qweight"], w["qzeros"], w["scales"][:1], w["g_idx"], group_size=32)
    with pytest.raises(ValueError, match="bias has shape"):
        QuantLinear(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], torch.zeros(31), group_size=32)
    with pytest.raises(ValueError, match="unknown GPTQ backend"):
        QuantLinear(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], group_size=32, backend="exllama")


def test_peft_lora_wraps_quant_linear(random_gptq, device):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    w = random_gptq(64, 48, group_size=32, device=device)
    bias = torch.randn(48, device=device)
    model = nn.Sequential()
    model.add_module("proj", _quant_linear(w, bias))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    wrapped = peft_model.base_model.model.proj
    assert isinstance(wrapped, LoraLinear) and isinstance(wrapped.base_layer, QuantLinear)
    assert wrapped.lora_A["default"].weight.device.type == torch.device(device).type

    x = torch.randn(4, 64, device=device)
    out = peft_model(x)
    lora = wrapped.lora_B["default"](wrapped.lora_A["default"](x)) * wrapped.scaling["default"]
    torch.testing.assert_close(out, x @ w["reference"].t() + bias + lora, rtol=1e-3, atol=1e-3)
    out.pow(2).sum().backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} and len(trainable) == 2
    assert wrapped.lora_A["default"].weight.grad is not None
