"""Each Triton kernel against its plain-torch reference, forward and backward, on odd shapes and three dtypes.

Low-precision results are judged against an fp32 ground truth: the kernel may be off
by at most about what the reference computed in the same dtype is off (plus a few
ulps), so a kernel that is more accurate than Hugging Face's own rounding passes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fmsaccel_foak import ops, reference
from fmsaccel_foak.ops import fused_linear_ce
from fmsaccel_foak.runtime import can_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _grads(fn, inputs, grad_outputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [o.detach() for o in outputs], [t.grad for t in inputs if t.requires_grad]


def _check(kernel, ref, truth, dtype, name):
    scale = truth.abs().max().clamp(min=1.0)
    kernel_err = (kernel.float() - truth.float()).abs().max()
    ref_err = (ref.float() - truth.float()).abs().max()
    assert kernel.dtype == ref.dtype, f"{name}: dtype {kernel.dtype} != {ref.dtype}"
    assert kernel_err <= 2 * ref_err + ULP[dtype] * scale, f"{name}: error {kernel_err:.3g} vs reference {ref_err:.3g}"


def _compare(op, ref_op, inputs, dtype, names):
    """Run op and ref_op in ``dtype`` and ref_op in fp32; compare outputs and input gradients."""
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    seeds = _seeds(op, low)
    out_k, grad_k = _grads(op, low, seeds)
    out_r, grad_r = _grads(ref_op, low, seeds)
    high = [t.float() if t.is_floating_point() else t for t in low]
    out_t, grad_t = _grads(ref_op, high, [s.float() for s in seeds])
    for i, (k, r, t) in enumerate(zip(out_k + grad_k, out_r + grad_r, out_t + grad_t, strict=True)):
        _check(k, r, t, dtype, f"{names[i] if i < len(names) else i}")


def _seeds(op, inputs):
    with torch.no_grad():
        outputs = op(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outputs]


def _randn(*shape, requires_grad=True, scale=1.0):
    return (torch.randn(*shape) * scale).to(DEVICE).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 64)])
def test_rms_norm(dtype, gemma, shape):
    torch.manual_seed(0)
    x, w = _randn(*shape), _randn(shape[-1], scale=0.1)
    if not gemma:
        w = (w + 1.0).detach().requires_grad_()
    _compare(lambda a, b: ops.rms_norm(a, b, 1e-6, gemma), lambda a, b: reference.rms_norm(a, b, 1e-6, gemma),
             [x, w], dtype, ["y", "dx", "dw"])


def test_rms_norm_fp32_weight_promotes_like_hf():
    """prepare_model_for_kbit_training leaves fp32 norm weights on a bf16 model: the output is fp32, as in HF."""
    x = _randn(4, 5, 33).to(torch.bfloat16)
    w = _randn(33)
    y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-5), atol=1e-2, rtol=1e-2)


def _angles(positions, rot, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("rot", [12, 6])  # full and partial rotary on head_dim 12
def test_rope_per_token_angles(dtype, unsqueeze_dim, rot):
    torch.manual_seed(0)
    batch, heads, kv_heads, seq, head_dim = 2, 3, 1, 5, 12
    q_shape = (batch, heads, seq, head_dim) if unsqueeze_dim == 1 else (batch, seq, heads, head_dim)
    k_shape = (batch, kv_heads, seq, head_dim) if unsqueeze_dim == 1 else (batch, seq, kv_heads, head_dim)
    # padding-free positions: restart inside a row
    positions = torch.tensor([[0, 1, 2, 0, 1], [7, 8, 9, 10, 11]])
    cos, sin = _angles(positions, rot)
    cos, sin = cos.to(dtype), sin.to(dtype)
    _compare(lambda q, k: ops.rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim),
             lambda q, k: reference.rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=unsqueeze_dim),
             [_randn(*q_shape), _randn(*k_shape)], dtype, ["q", "k", "dq", "dk"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_position_ids_table(dtype):
    """With a [max_position, rot] table the kernel looks angles up by position_ids (restarting per packed example)."""
    torch.manual_seed(0)
    q, k = _randn(1, 2, 9, 8).to(dtype), _randn(1, 1, 9, 8).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]], device=DEVICE)
    table_cos, table_sin = _angles(torch.arange(16), 8)
    got_q, got_k = ops.rope(q, k, table_cos.to(dtype), table_sin.to(dtype), position_ids=positions)
    per_token_cos, per_token_sin = _angles(positions.cpu(), 8)
    want_q, want_k = reference.rope(q, k, per_token_cos.to(dtype), per_token_sin.to(dtype))
    torch.testing.assert_close(got_q, want_q, atol=ULP[dtype], rtol=ULP[dtype])
    torch.testing.assert_close(got_k, want_k, atol=ULP[dtype], rtol=ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37), (4, 130)])
def test_swiglu(dtype, shape):
    torch.manual_seed(0)
    _compare(ops.swiglu, reference.swiglu, [_randn(*shape), _randn(*shape)], dtype, ["y", "dgate", "dup"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_packed(dtype):
    torch.manual_seed(0)
    _compare(ops.swiglu_packed, lambda t: reference.swiglu(*t.chunk(2, dim=-1)), [_randn(7, 2 * 33)], dtype,
             ["y", "dgate_up"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(dtype, reduction):
    torch.manual_seed(0)
    targets = torch.randint(0, 300, (13,), device=DEVICE)
    targets[[2, 9]] = -100
    _compare(lambda z: ops.cross_entropy(z, targets, reduction=reduction),
             lambda z: reference.cross_entropy(z, targets, reduction=reduction),
             [_randn(13, 300, scale=3.0)], dtype, ["loss", "dlogits"])


@pytest.mark.parametrize("n_rows", [5, 8])
def test_logit_stats_outputs_are_aligned_for_every_token_count(n_rows):
    """Triton specialises pointers on 16-byte alignment: the stats must not flip it with the token count."""
    from fmsaccel_foak.ops.cross_entropy import logit_stats

    logits = torch.randn(n_rows, 40, device=DEVICE)
    targets = torch.randint(0, 40, (n_rows,), device=DEVICE)
    outputs = logit_stats(logits, targets, entropy=True)
    assert all(t.data_ptr() % 16 == 0 for t in outputs)
    lse = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(outputs[0], lse)
    torch.testing.assert_close(outputs[1], logits.gather(1, targets[:, None])[:, 0])


def test_cross_entropy_num_items_in_batch():
    """Under gradient accumulation HF divides the summed loss by the tokens of the whole batch."""
    logits, targets = _randn(6, 40), torch.tensor([1, 2, -100, 3, 4, 5], device=DEVICE)
    got = ops.cross_entropy(logits, targets, num_items_in_batch=11)
    torch.testing.assert_close(got, reference.cross_entropy(logits, targets, reduction="sum") / 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_fused_linear_cross_entropy(monkeypatch, dtype, trainable_head):
    """Chunked over tokens (several chunks), Granite-style logit scale; hidden and lm_head gradients."""
    monkeypatch.setattr(fused_linear_ce, "MIN_CHUNK", 8)
    torch.manual_seed(0)
    labels = torch.randint(0, 96, (41,), device=DEVICE)
    labels[:6] = -100

    def fused(h, w):
        return ops.fused_linear_cross_entropy(h, w, labels, logit_scale=0.25)

    def plain(h, w):
        return reference.cross_entropy((h @ w.t()) * 0.25, labels)

    inputs = [_randn(41, 16), _randn(96, 16, requires_grad=trainable_head, scale=0.5)]
    names = ["loss", "dhidden"] + (["dweight"] if trainable_head else [])
    _compare(fused, plain, inputs, dtype, names)


def test_token_logprobs_weighted_tokens(monkeypatch):
    """Per-token upstream gradients (any token weighting) give exact hidden and weight gradients."""
    monkeypatch.setattr(fused_linear_ce, "MIN_CHUNK", 8)
    torch.manual_seed(0)
    targets = torch.randint(0, 50, (20,), device=DEVICE)
    weights = torch.rand(20, device=DEVICE)
    for trainable in (False, True):
        h, w = _randn(20, 12), _randn(50, 12, requires_grad=trainable)
        logp, entropy, top1 = ops.token_logprobs(h, w, targets)
        (logp * weights).sum().backward()
        h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(trainable)
        ref_logp, ref_entropy, ref_top1 = reference.token_logprobs(h2, w2, targets)
        (ref_logp * weights).sum().backward()
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
        assert torch.equal(top1, ref_top1)
        torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
        if trainable:
            torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_fallback_to_reference_is_announced_once(caplog):
    """A kernel that cannot launch (CPU tensor, no interpreter) is reported once, then the reference runs."""

    def not_a_kernel():
        pass

    with caplog.at_level(logging.WARNING, logger="fmsaccel_foak"):
        assert not can_launch(not_a_kernel, torch.zeros(1))
        assert not can_launch(not_a_kernel, torch.zeros(1))
    assert sum("plain-torch reference" in r.message for r in caplog.records) == 1
