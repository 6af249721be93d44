"""training.attention.sdpa: padded batches keep away from cuDNN's per-length planning, same results as plain SDPA."""

import pytest
import torch
import torch.nn.functional as F

from fmsaccel_aadp.attention import SDPA_NAME_PREFIX
from fmsaccel_aadp.plugin import PADDING_FREE, SDPA
from fmsaccel_aadp.spec import AADP
from fmsaccel_framework.plugin import PluginError, TrainContext


def _augment(model, cudnn="unpadded"):
    ctx = TrainContext(args={}, torch_dtype=torch.float32)
    return AADP.build({SDPA: {"cudnn": cudnn}}).augment(model, ctx), ctx


@pytest.fixture
def cudnn_flags_seen(monkeypatch):
    """What ``torch.backends.cuda.cudnn_sdp_enabled()`` said at every SDPA call (the flag PyTorch's choice reads)."""
    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _batch(padded: bool):
    ids = torch.randint(2, 200, (3, 11))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, 7:] = 0
        mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [True, False])
def test_same_logits_and_gradients_as_plain_sdpa(tiny_llama, padded):
    torch.manual_seed(0)
    reference = tiny_llama().float()
    ours = tiny_llama().float()
    ours.load_state_dict(reference.state_dict())
    ours, ctx = _augment(ours)
    assert ours.config._attn_implementation == f"{SDPA_NAME_PREFIX}_unpadded"
    assert ctx.report.count(AADP.name) == 2  # one per decoder layer
    ids, mask = _batch(padded)
    outputs = []
    for model in (reference, ours):
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        outputs.append((out.logits[mask.bool()], grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cudnn", "padded", "allowed"), [
    ("unpadded", True, False), ("unpadded", False, True), ("never", False, False), ("always", True, True),
])
def test_cudnn_is_allowed_only_where_the_mode_says(tiny_llama, cudnn_flags_seen, cudnn, padded, allowed):
    model, _ = _augment(tiny_llama(), cudnn)
    ids, mask = _batch(padded)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert cudnn_flags_seen == [allowed] * 2  # one call per decoder layer
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after each call


def test_refused_with_padding_free_or_another_attention(tiny_llama):
    with pytest.raises(PluginError, match="padding_free leaves no padding"):
        AADP.build({SDPA: {"cudnn": "unpadded"}, PADDING_FREE: {"method": "huggingface", "backend": "auto"}})
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with pytest.raises(PluginError, match="model uses 'eager' attention"):
        _augment(model)
