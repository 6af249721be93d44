"""Every backend that can run here: a packed row equals running each example alone, forward and backward."""

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from fmsaccel_aadp import attention as A
from fmsaccel_aadp.collator import collate_padding_free
from fmsaccel_framework.plugin import PluginError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = (70, 1, 97, 33)  # odd sizes, a 1-token example, and a row longer than flex's 128-token block


def _dtype(backend: str) -> torch.dtype:
    return torch.bfloat16 if backend in ("flash_attn", "varlen") else torch.float32


def _tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:  # GPU kernels accumulate in other orders than the CPU's
        return {"atol": 1e-5, "rtol": 1e-4} if DEVICE == "cpu" else {"atol": 1e-4, "rtol": 1e-3}
    return {"atol": 3e-2, "rtol": 3e-2}


def _skip_unless_runs(backend: str, device: str, dtype: torch.dtype, training: bool) -> None:
    reason = A.backend_unavailable_reason(backend, device, dtype, training)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")


PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packing_kwargs(batch: dict) -> dict:
    """The attention kwargs a padding-free batch carries (what transformers passes on to the attention)."""
    return {key: batch[key] for key in PACKING_KEYS}


def _model_kwargs(batch: dict, device: str, with_cu_seqlens: bool = True) -> dict:
    keys = ["input_ids", "position_ids"] + (list(PACKING_KEYS) if with_cu_seqlens else [])
    return {k: batch[k].to(device) if torch.is_tensor(batch[k]) else batch[k] for k in keys}


def _per_example_logits(model, rows, device):
    model.set_attn_implementation("sdpa")
    return torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits for r in rows], dim=1)


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_packed_forward_equals_each_example_alone(backend, tiny_llama, random_examples, device):
    dtype = _dtype(backend)
    _skip_unless_runs(backend, device, dtype, training=False)
    model, rows = tiny_llama(dtype=dtype), random_examples(LENGTHS)
    batch = collate_padding_free(rows)
    with torch.no_grad():
        expected = _per_example_logits(model, rows, device)
        model.set_attn_implementation(A.register_attention(backend))
        packed = model(**_model_kwargs(batch, device)).logits
        # without cu_seq_lens the boundaries come from the restarting position_ids
        derived = model(**_model_kwargs(batch, device, with_cu_seqlens=False)).logits
    torch.testing.assert_close(packed.float(), expected.float(), **_tolerance(dtype))
    torch.testing.assert_close(derived.float(), expected.float(), **_tolerance(dtype))


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_packed_backward_equals_each_example_alone(backend, tiny_llama, random_examples, device):
    dtype = _dtype(backend)
    _skip_unless_runs(backend, device, dtype, training=True)
    rows = random_examples(LENGTHS, seed=1)
    total = sum(LENGTHS)
    weights = torch.randn(1, total, 256, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def grads(model, logits):
        (logits.float() * weights.float()).sum().backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters()}

    reference = tiny_llama(dtype=dtype)
    expected = grads(reference, _per_example_logits(reference, rows, device))

    model = tiny_llama(dtype=dtype)
    model.set_attn_implementation(A.register_attention(backend))
    got = grads(model, model(**_model_kwargs(collate_padding_free(rows), device)).logits)
    tol = _tolerance(dtype) if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_take_an_ordinary_causal_path(padding_side, tiny_llama, random_examples, device):
    """Evaluation with padding must still be right after the model switched to our attention."""
    model, rows = tiny_llama(), random_examples((5, 11, 8))
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        where = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, where], mask[i, where] = torch.tensor(r["input_ids"]), 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(A.register_attention("sdpa_masked"))
        got = model(input_ids=ids, attention_mask=mask).logits
        single = model(input_ids=ids[:1, :5] if padding_side == "right" else ids[:1, -5:]).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single[0], expected[0][real[0]], atol=1e-5, rtol=1e-4)


def test_generation_with_a_kv_cache_matches_sdpa(tiny_llama, device):
    model = tiny_llama()
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
        model.set_attn_implementation(A.register_attention("sdpa_masked"))
        got = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_gqa_head_repeat_matches_transformers_order():
    kv = torch.randn(1, 2, 9, 4)  # [B, Hkv, T, D]
    expected = repeat_kv(kv, 3)  # [B, Hkv*3, T, D]
    got = A._repeat_kv(kv[0].transpose(0, 1), 3)  # [T, Hkv*3, D]
    torch.testing.assert_close(got, expected[0].transpose(0, 1))


def test_varlen_causal_keyword_is_found_for_this_torch():
    if A.backend_unavailable_reason("varlen", "cuda") == f"torch {torch.__version__} has no torch.nn.attention.varlen":
        pytest.skip("this torch has no torch.nn.attention.varlen")
    assert A._varlen_api().causal in ({"window_size": (-1, 0)}, {"is_causal": True})


def test_auto_picks_a_backend_that_runs_and_says_why():
    backend, why = A.resolve_backend("auto", device_type="cpu", dtype=torch.bfloat16)
    assert backend == "sdpa_masked"
    assert "varlen: varlen runs on CUDA only" in why and "flex: FlexAttention has no backward" in why
    with pytest.raises(RuntimeError, match="varlen.*CUDA only"):
        A.resolve_backend("varlen", device_type="cpu")
    with pytest.raises(RuntimeError, match="flex.*no backward"):
        A.resolve_backend("flex", device_type="cpu")
    assert "float16/bfloat16" in A.backend_unavailable_reason("varlen", "cuda", torch.float32)


def _packed_qkv(lengths, heads=4, kv_heads=2, dim=8):
    total = sum(lengths)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, total, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    return q, k, v, collate_padding_free([{"input_ids": [0] * n} for n in lengths])


def test_a_call_the_backend_cannot_serve_is_an_error_or_a_loud_fallback():
    q, k, v, batch = _packed_qkv((3, 5))
    module = torch.nn.Module()
    kwargs = _packing_kwargs(batch)
    with pytest.raises(RuntimeError, match="cannot serve this call"):
        A.make_attention_forward("varlen", strict=True)(module, q, k, v, None, **kwargs)
    with pytest.warns(UserWarning, match="using the masked SDPA path"):
        out, _ = A.make_attention_forward("varlen", strict=False)(module, q, k, v, None, **kwargs)
    expected, _ = A.make_attention_forward("sdpa_masked")(module, q, k, v, None, **kwargs)
    torch.testing.assert_close(out, expected)


def test_sliding_window_shorter_than_an_example_is_refused():
    q, k, v, batch = _packed_qkv((3, 9))
    kwargs = {"cu_seq_lens_q": batch["cu_seq_lens_q"], "max_length_q": 9, "sliding_window": 4}
    with pytest.raises(PluginError, match="sliding window"):
        A.make_attention_forward("sdpa_masked")(torch.nn.Module(), q, k, v, None, **kwargs)


def test_packing_metadata_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    packing = A.packing_from_position_ids(pos)
    assert packing.cu_seqlens.tolist() == [0, 3, 4, 6] and packing.max_length == 3
    assert A.packing_from_position_ids(torch.arange(5)[None]) is None
    mask = A.block_causal_mask(packing, 6).int().tolist()
    assert mask[2] == [1, 1, 1, 0, 0, 0] and mask[3] == [0, 0, 0, 1, 0, 0] and mask[5] == [0, 0, 0, 0, 1, 1]


def _per_sequence_sdpa(q, k, v, cu, scale=None):
    """A CPU stand-in for a varlen kernel: [T, H, D] in and out, causal within each sequence."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                    enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


def _torch_2_13_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0) and (enable_gqa or q.shape[1] == k.shape[1])
    return _per_sequence_sdpa(q, k, v, cu_q, scale)


def _torch_2_10_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
    assert is_causal and q.shape[1] == k.shape[1], "this API has no GQA: KV heads must come repeated"
    return _per_sequence_sdpa(q, k, v, cu_q)


@pytest.mark.parametrize("api", ["2.13", "2.10"])
def test_varlen_glue_for_each_torch_api(api, monkeypatch):
    """Layout, GQA and scale handling around varlen_attn, with a CPU stand-in for the CUDA kernel."""
    fake = A._VarlenApi(_torch_2_13_varlen, {"window_size": (-1, 0)}, True, True) if api == "2.13" else \
        A._VarlenApi(_torch_2_10_varlen, {"is_causal": True}, False, False)
    monkeypatch.setattr(A, "_varlen_api", lambda: fake)
    q, k, v, batch = _packed_qkv((4, 1, 7))
    packing = A.Packing(batch["cu_seq_lens_q"], batch["max_length_q"])
    for scaling in (None, 0.5):
        got = A.varlen_attention_packed(q, k, v, packing, scaling, 0.0)
        expected = A.sdpa_masked_attention(q, k, v, packing, scaling, 0.0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_flash_attn_glue(monkeypatch):
    """Layout and keywords around flash_attn_varlen_func, with a CPU stand-in for the CUDA kernel."""
    import sys
    import types

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and dropout_p == 0.0 and cu_q is cu_k and max_q == max_k == 7
        return _per_sequence_sdpa(q, k, v, cu_q, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    q, k, v, batch = _packed_qkv((4, 1, 7))
    packing = A.Packing(batch["cu_seq_lens_q"], batch["max_length_q"])
    got = A.flash_attn_packed(q, k, v, packing, 0.3, 0.0)
    torch.testing.assert_close(got, A.sdpa_masked_attention(q, k, v, packing, 0.3, 0.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lengths, dense", [((6, 6, 6), True), ((6, 5, 7), False), ((4, 4, 5), False)])
def test_examples_of_one_length_run_as_a_dense_batch(lengths, dense, monkeypatch):
    """A row of equal-length examples (workload P) skips the varlen kernel: dense causal SDPA, the same values
    and gradients as the block-causal reference."""
    q, k, v, batch = _packed_qkv(lengths)
    kwargs = _packing_kwargs(batch)
    packed_calls = []
    monkeypatch.setitem(A.PACKED_BACKENDS, "sdpa_masked", A.PackedBackend(
        lambda *a: packed_calls.append(1) or A.sdpa_masked_attention(*a), supports_dropout=True))
    forward = A.make_attention_forward("sdpa_masked")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = forward(torch.nn.Module(), *leaves, None, scaling=0.3, **kwargs)
    assert bool(packed_calls) is not dense
    reference_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    packing = A.Packing(batch["cu_seq_lens_q"], batch["max_length_q"])
    expected = A.sdpa_masked_attention(*reference_leaves, packing, 0.3, 0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, reference_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)


def test_equal_length_rows_keep_the_backends_dropout_refusal():
    """varlen and flex refuse attention dropout on every row, so the dense path does not accept it on some rows."""
    q, k, v, batch = _packed_qkv((6, 6))
    kwargs = _packing_kwargs(batch)
    forward = A.make_attention_forward("flex", strict=True)
    out, _ = forward(torch.nn.Module(), q, k, v, None, **kwargs)  # dense: flex itself is never reached
    assert out.shape == (1, 12, 4, 8)
    with pytest.raises(PluginError):
        forward(torch.nn.Module(), q, k, v, None, dropout=0.1, **kwargs)
