"""The fused LoRA op against PEFT's own LoRA layers, for every base layer kind, with dropout."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE, QUANTIZE, KernelMaskDropout
from peft import LoraConfig, get_peft_model
from torch import nn

from fmsaccel_foak.ops import fused_lora, lora_dropout
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


def _peft_block(base_layer, dropout, targets=("q_proj", "k_proj", "v_proj", "o_proj"), in_kernel=False):
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
                module.lora_dropout["default"] = (KernelMaskDropout if in_kernel else _SameMaskDropout)(dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a random B tests the full backward
            nn.init.normal_(p, std=0.1)
    return model.train()


def _run(model, fused: bool, keep_weights: bool = False, in_kernel: bool = False):
    inner = model.base_model.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g).to(DEVICE).requires_grad_()
    h = torch.randn(2, 5, 64, generator=g).to(DEVICE).requires_grad_()
    seeds = [torch.randn(2, 5, n, generator=g).to(DEVICE) for n in (64, 32, 32, 64)]
    model.zero_grad()
    torch.manual_seed(7)  # same dropout masks on both paths (see _SameMaskDropout)
    if fused:
        q, k, v = fused_lora(x, [inner.q_proj, inner.k_proj, inner.v_proj], keep_weights, dropout_in_kernel=in_kernel)
        (o,) = fused_lora(h, [inner.o_proj], keep_weights, dropout_in_kernel=in_kernel)
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


@pytest.mark.parametrize("base_layer", ["bitsandbytes", None])
def test_dropout_drawn_in_kernel_matches_peft_with_the_kernels_masks(base_layer):
    """``dropout_in_kernel``: the rank-r matmuls draw the mask from a per-projection seed and keep none; with PEFT's
    dropout given the same masks (``keep_mask``), outputs and every gradient agree."""
    model = _peft_block(base_layer, 0.25, in_kernel=True)
    want_out, want_dx, want_dh, want_grads = _run(model, fused=False)
    got_out, got_dx, got_dh, got_grads = _run(model, fused=True, in_kernel=True)
    for got, want in zip([*got_out, got_dx, got_dh], [*want_out, want_dx, want_dh], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == 8
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_dropout_drawn_in_kernel_keeps_no_mask_and_replays_under_checkpointing():
    """The op saves a seed, not an input-sized mask, and checkpoint recompute (which restores the RNG) draws the same
    masks: the same gradients with and without checkpointing."""
    model = _peft_block(None, 0.25)
    inner = model.base_model.model
    layers = [inner.q_proj, inner.k_proj, inner.v_proj]
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def loss(x, in_kernel=True):
        return sum(t.square().sum() for t in fused_lora(x, layers, dropout_in_kernel=in_kernel))

    def input_sized_saved(in_kernel):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.manual_seed(5)
            loss(x.clone().requires_grad_(), in_kernel)
        return sum(tuple(t.shape) == (21, 64) for t in saved)

    assert input_sized_saved(in_kernel=False) == 4  # x and a mask per projection
    assert input_sized_saved(in_kernel=True) == 1  # x alone
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        torch.manual_seed(5)
        x_ = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(loss, x_, use_reentrant=False) if checkpointed else loss(x_)
        out.backward()
        grads.append([x_.grad, *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    assert len(grads[0]) == 7  # x and q/k/v's A and B
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_dropout_drawn_in_kernel_compiles_as_opaque_ops():
    """Inside ``torch.compile`` (compiled layers) the kernels are custom ops Dynamo does not trace into: one graph,
    and the same outputs and gradients as eager for the same generator state."""
    model = _peft_block(None, 0.25)
    inner = model.base_model.model
    layers = [inner.q_proj, inner.k_proj, inner.v_proj]
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def loss(x):
        return sum(t.square().sum() for t in fused_lora(x, layers, dropout_in_kernel=True))

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        torch.manual_seed(5)
        x_ = x.clone().requires_grad_()
        out = fn(x_)
        out.backward()
        results.append([out.detach(), x_.grad, *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    assert len(results[0]) == 8
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,rank,p", [(37, 45, 8, 0.1), (16, 64, 20, 0.5), (5, 33, 4, 0.25), (70, 40, 8, 0.1)])
@pytest.mark.parametrize("split_min_rows", [2048, 8], ids=["one-row-range", "row-ranges"])
def test_dropout_kernels_match_torch_with_the_same_mask(dtype, rows, cols, rank, p, split_min_rows, monkeypatch):
    """Each kernel against plain torch given the mask ``keep_mask`` materialises (odd sizes, ranks below and above
    16): ``(x * keep) @ A^T``, ``dxa^T @ (x * keep)`` (over one or several row ranges, summed) and
    ``dx += (dxa @ A) * keep``."""
    monkeypatch.setattr(lora_dropout, "SPLIT_MIN_ROWS", split_min_rows)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    a = torch.randn(rank, cols, generator=gen).to(DEVICE, dtype)
    dxa = torch.randn(rows, rank, generator=gen).to(DEVICE, dtype)
    dx = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    seed = torch.tensor([12345], device=DEVICE)
    keep = lora_dropout.keep_mask(seed, (rows, cols), p, torch.float32, DEVICE)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    dropped = x.float() * keep
    torch.testing.assert_close(lora_dropout.dropped_down(x, a, seed, p).float(), dropped @ a.float().t(), **tol)
    torch.testing.assert_close(lora_dropout.dropped_weight_grad(dxa, x, seed, p), dxa.float().t() @ dropped, **tol)
    want = dx.float() + (dxa.float() @ a.float()) * keep
    lora_dropout.add_dropped_input_grad(dx, dxa, a, seed, p)
    torch.testing.assert_close(dx.float(), want, **tol)


def test_the_weight_gradient_splits_long_inputs_into_row_ranges():
    """Workload P's 16k rows x 4096 columns: 128 column blocks, so four row ranges fill ~512 programs; short inputs
    (R's padding-free rows, the tests) keep one range."""
    assert lora_dropout.row_splits(16384, 128) == 4
    assert lora_dropout.row_splits(1000, 128) == 1
    assert lora_dropout.row_splits(16384, 1024) == 1


def test_the_kernels_keep_mask_is_a_seeded_bernoulli_draw():
    """About ``1 - p`` of the elements are kept, the same seed draws the same mask, another seed another one."""
    seed, other = torch.tensor([7], device=DEVICE), torch.tensor([8], device=DEVICE)
    keep = lora_dropout.keep_mask(seed, (64, 100), 0.3, torch.float32, DEVICE)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep.mean().item() - 0.7) < 0.03
    assert torch.equal(keep, lora_dropout.keep_mask(seed, (64, 100), 0.3, torch.float32, DEVICE))
    assert not torch.equal(keep, lora_dropout.keep_mask(other, (64, 100), 0.3, torch.float32, DEVICE))


def test_the_keep_mask_depends_on_the_element_alone(monkeypatch):
    """Eight elements share one Philox draw (16 bits each): every column position of the eight keeps about
    ``1 - p``, neighbours are uncorrelated, and the mask does not depend on the kernels' tile sizes."""
    seed = torch.tensor([99], device=DEVICE)
    keep = lora_dropout.keep_mask(seed, (96, 520), 0.1, torch.float32, DEVICE)
    assert lora_dropout.keep_threshold(0.1) == 6554 and lora_dropout.keep_threshold(0.0) == 0
    assert abs(keep.mean().item() - 0.9) < 0.005
    for position in range(8):
        assert abs(keep[:, position::8].mean().item() - 0.9) < 0.02, position
    centred = keep - keep.mean()
    for shift in (1, 2, 4, 8):
        corr = (centred[:, shift:] * centred[:, :-shift]).mean() / centred.var()
        assert abs(corr.item()) < 0.03, (shift, corr.item())
    monkeypatch.setattr(lora_dropout, "INTERPRETER_TILES", (16, 8, 4))
    monkeypatch.setattr(lora_dropout, "GPU_TILES", dict.fromkeys(lora_dropout.GPU_TILES, (16, 8, 4)))
    assert torch.equal(keep, lora_dropout.keep_mask(seed, (96, 520), 0.1, torch.float32, DEVICE))


def _philox4x32(counters, seed: int, rounds: int):
    """Philox4x32-``rounds`` (Salmon et al.) of ``(counter, 0, 0, 0)`` under the 64-bit key ``seed``, in numpy."""
    import numpy as np

    c0, c1, c2, c3 = (np.asarray(counters, dtype=np.uint64), *np.zeros((3, *np.shape(counters)), dtype=np.uint64))
    k0, k1, mask = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32), np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        hi_lo_a, hi_lo_b = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # 32 x 32 bits fit in 64
        c0, c1, c2, c3 = ((hi_lo_b >> np.uint64(32)) ^ c1 ^ k0, hi_lo_b & mask, (hi_lo_a >> np.uint64(32)) ^ c3 ^ k1,
                          hi_lo_a & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def test_the_keep_mask_is_philox_of_the_element_index():
    """The mask, bit for bit, from an independent Philox: element ``(m, k)`` takes 16 bits of the draw at counter
    ``m * ceil(K / 8) + k // 8`` (of ``PHILOX_ROUNDS`` rounds, fewer than Triton's default 10), kept where they are
    at least ``round(p * 65536)``."""
    import numpy as np

    rows, cols, p, seed = 5, 43, 0.3, 2**40 + 12345  # a seed with both key words set; a ragged last group
    keep = lora_dropout.keep_mask(torch.tensor([seed], device=DEVICE), (rows, cols), p, torch.float32, DEVICE)
    groups = -(-cols // 8)
    counters = np.arange(rows)[:, None] * groups + np.arange(cols)[None, :] // 8

    def expected(rounds: int):
        words = _philox4x32(counters, seed, rounds)
        # the eight 16-bit halves of a draw, in column order: the low halves of w0 w2 w1 w3, then the high ones
        position = np.arange(cols)[None, :] % 8
        word = np.select([position % 4 == j for j in range(4)], [words[0], words[2], words[1], words[3]])
        half = np.where(position < 4, word & 0xFFFF, word >> 16)
        return torch.from_numpy((half >= lora_dropout.keep_threshold(p)).astype(np.float32))

    assert lora_dropout.PHILOX_ROUNDS.value == 7
    torch.testing.assert_close(keep.cpu(), expected(7), rtol=0, atol=0)
    assert not torch.equal(keep.cpu(), expected(10))


def test_dropout_in_kernel_is_a_fused_lora_option_and_says_so():
    """The key needs ``fused_lora`` (a clear error otherwise), and the run's report says the masks are drawn in the
    kernels and are not PEFT's stream."""
    from foak_testing import build_plugin, tiny_model

    from fmsaccel_framework.plugin import PluginError, TrainContext

    path = "peft.quantization.fused_ops_and_kernels"
    with pytest.raises(PluginError, match="dropout_in_kernel .* needs fused_lora: true"):
        build_plugin(path, dropout_in_kernel=True, fast_rms_layernorm=True)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    ctx = TrainContext(args={})
    build_plugin(path, fused_lora=True, dropout_in_kernel=True).augment(model, ctx)
    assert any("dropout_in_kernel" in note and "not PEFT's random stream" in note for _, note in ctx.report.notes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_proj", [2, 3])
@pytest.mark.parametrize("rows,cols,rank,p,split_min_rows", [(37, 72, 4, 0.25, 2048), (70, 40, 16, 0.1, 8)])
def test_multi_projection_kernels_draw_each_projections_own_mask(dtype, n_proj, rows, cols, rank, p, split_min_rows,
                                                                 monkeypatch):
    """Projections sharing ``x`` (q/k/v) in one launch, each with its own seed: the masks are exactly those the
    per-projection kernels draw (``keep_mask`` of each seed) in ``(x * keep_j) @ A_j^T``, ``dxa_j^T @ (x * keep_j)``
    (one or several row ranges) and ``dx += sum_j (dxa_j @ A_j) * keep_j``."""
    monkeypatch.setattr(lora_dropout, "SPLIT_MIN_ROWS", split_min_rows)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    a = torch.randn(n_proj, rank, cols, generator=gen).to(DEVICE, dtype)
    dxa = torch.randn(n_proj, rows, rank, generator=gen).to(DEVICE, dtype)
    dx = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    seeds = torch.tensor([12345, 777, 4242][:n_proj], device=DEVICE)
    keeps = [lora_dropout.keep_mask(seeds[j:j + 1], (rows, cols), p, torch.float32, DEVICE) for j in range(n_proj)]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    down = lora_dropout.dropped_down_multi(x, a, seeds, p)
    weight_grad = lora_dropout.dropped_weight_grad_multi(dxa, x, seeds, p)
    assert down.shape == (n_proj, rows, rank) and down.dtype == dtype
    assert weight_grad.shape == (n_proj, rank, cols) and weight_grad.dtype == torch.float32
    want_dx = dx.float()
    for j, keep in enumerate(keeps):
        dropped = x.float() * keep
        torch.testing.assert_close(down[j].float(), dropped @ a[j].float().t(), **tol)
        torch.testing.assert_close(weight_grad[j], dxa[j].float().t() @ dropped, **tol)
        want_dx = want_dx + (dxa[j].float() @ a[j].float()) * keep
    lora_dropout.add_dropped_input_grad_multi(dx, dxa, a, seeds, p)
    torch.testing.assert_close(dx.float(), want_dx, **tol)


@pytest.mark.parametrize("case", ["qkv", "k-unused", "other-p"])
def test_projections_sharing_x_share_the_dropout_launches(case, monkeypatch):
    """q/k/v with in-kernel dropout, the same rank and p: one down, one weight-gradient and one input-gradient launch
    for all three, and the outputs and gradients of one launch per projection (``MAX_PROJECTIONS = 1``). A
    projection whose output gets no gradient leaves the backward's launches to the other two; another ``p`` keeps
    the launches per projection."""
    model = _peft_block(None, 0.25)
    inner = model.base_model.model
    if case == "other-p":
        inner.v_proj.lora_dropout["default"].p = 0.5
    layers = [inner.q_proj, inner.k_proj, inner.v_proj]
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    launches = []
    for name in ("dropped_down", "dropped_weight_grad", "add_dropped_input_grad", "dropped_down_multi",
                 "dropped_weight_grad_multi", "add_dropped_input_grad_multi"):
        op = getattr(lora_dropout, name)
        monkeypatch.setattr(lora_dropout, name, lambda *args, op=op, name=name: launches.append(name) or op(*args))

    def run():
        model.zero_grad()
        launches.clear()
        torch.manual_seed(5)
        x_ = x.clone().requires_grad_()
        q, k, v = fused_lora(x_, layers, dropout_in_kernel=True)
        (q.square().sum() + v.square().sum() + (0 if case == "k-unused" else k.square().sum())).backward()
        return [q, k, v, x_.grad, *(p.grad for p in model.parameters() if p.grad is not None)], sorted(launches)

    got, fused_launches = run()
    monkeypatch.setattr(lora_dropout, "MAX_PROJECTIONS", 1)
    want, single_launches = run()
    assert len(got) == len(want) == (8 if case == "k-unused" else 10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    backward = ["dropped_weight_grad", "add_dropped_input_grad"] * (2 if case == "k-unused" else 3)
    assert single_launches == sorted(["dropped_down"] * 3 + backward)
    multi = ["add_dropped_input_grad_multi", "dropped_down_multi", "dropped_weight_grad_multi"]
    assert fused_launches == (single_launches if case == "other-p" else multi)
