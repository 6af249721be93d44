"""Expert primitives (Triton and torch backends) against plain per-row PyTorch, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moe_testing import DEVICE, max_diff
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from fmsaccel_framework.plugin import TrainContext
from fmsaccel_moe import torch_kernels, triton_kernels
from fmsaccel_moe.ops import ExpertLoRA, routed_experts
from fmsaccel_moe.routing import route

BACKENDS = {"triton": triton_kernels, "grouped_mm": torch_kernels}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _routing(tokens: int, experts: int, top_k: int, seed: int = 0, skip_expert: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0  # an expert nobody picks: empty group
    return scores.topk(top_k, dim=-1).indices.to(DEVICE)


def _reference_mm(a, weight, routing, *, gather, scatter, transpose_weight, swiglu, row_scale):
    rows = []
    for r in range(routing.num_rows):
        x = (a[routing.token[r]] if gather else a[r]).double()
        if swiglu:
            n = x.numel() // 2
            x = F.silu(x[:n]) * x[n:]
        w = weight[routing.expert[r]].double()
        y = x @ w if transpose_weight else w @ x
        rows.append(y * row_scale[r].double() if row_scale is not None else y)
    out = torch.stack(rows)
    return out[routing.inverse()] if scatter else out


def _reference_xty(a, b, routing, *, gather_a, gather_b, swiglu_b, a_row_scale):
    out = torch.zeros(routing.num_experts, a.size(1), b.size(1) // (2 if swiglu_b else 1), dtype=torch.float64,
                      device=a.device)
    for r in range(routing.num_rows):
        x = (a[routing.token[r]] if gather_a else a[r]).double()
        if a_row_scale is not None:
            x = x * a_row_scale[r].double()
        y = (b[routing.token[r]] if gather_b else b[r]).double()
        if swiglu_b:
            n = y.numel() // 2
            y = F.silu(y[:n]) * y[n:]
        out[routing.expert[r]] += torch.outer(x, y)
    return out


MM_CASES = [
    dict(gather=True, scatter=False, transpose_weight=False, swiglu=False, scale=False),  # up projection
    dict(gather=False, scatter=True, transpose_weight=False, swiglu=True, scale=True),  # down + weights
    dict(gather=True, scatter=False, transpose_weight=True, swiglu=False, scale=False),  # backward of down
    dict(gather=False, scatter=True, transpose_weight=True, swiglu=False, scale=False),  # backward of up
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(MM_CASES)))
def test_expert_mm_matches_reference(backend, dtype, case):
    flags = dict(MM_CASES[case])
    scale = flags.pop("scale")
    tokens, experts, top_k, k, n = 29, 5, 2, 40, 72  # several K steps and N tiles
    routing = route(_routing(tokens, experts, top_k, seed=case, skip_expert=3), experts)
    gen = torch.Generator().manual_seed(case)
    rows = tokens if flags["gather"] else tokens * top_k
    a = torch.randn(rows, 2 * k if flags["swiglu"] else k, generator=gen).to(DEVICE, dtype)
    shape = (experts, k, n) if flags["transpose_weight"] else (experts, n, k)
    weight = (torch.randn(*shape, generator=gen) / k**0.5).to(DEVICE, dtype)
    row_scale = torch.rand(tokens * top_k, generator=gen).to(DEVICE) if scale else None
    out = BACKENDS[backend].expert_mm(a, weight, routing, row_scale=row_scale, **flags)
    ref = _reference_mm(a, weight, routing, row_scale=row_scale, **flags)
    assert out.dtype == dtype and out.shape == ref.shape
    assert max_diff(out, ref) <= TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gather_a,gather_b,swiglu_b,scale", [(True, False, True, True), (False, True, False, False)])
def test_expert_xty_matches_reference(backend, dtype, gather_a, gather_b, swiglu_b, scale):
    tokens, experts, top_k, m, n = 23, 4, 2, 70, 36
    routing = route(_routing(tokens, experts, top_k, seed=7, skip_expert=1), experts)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(tokens if gather_a else tokens * top_k, m, generator=gen).to(DEVICE, dtype)
    b = torch.randn(tokens if gather_b else tokens * top_k, 2 * n if swiglu_b else n, generator=gen).to(DEVICE, dtype)
    a_row_scale = torch.rand(tokens * top_k, generator=gen).to(DEVICE) if scale else None
    flags = dict(gather_a=gather_a, gather_b=gather_b, swiglu_b=swiglu_b, a_row_scale=a_row_scale)
    out = BACKENDS[backend].expert_xty(a, b, routing, **flags)
    ref = _reference_xty(a, b, routing, **flags)
    assert out.shape == ref.shape
    assert ref[1].abs().max() == 0 and out[1].abs().max() == 0  # the expert nobody picked
    assert max_diff(out, ref) <= TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_swiglu_forward_and_backward_match_autograd(backend):
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(37, 2 * 300, generator=gen).to(DEVICE)
    grad = torch.randn(37, 300, generator=gen).to(DEVICE)
    scale = torch.rand(37, generator=gen).to(DEVICE)
    h = BACKENDS[backend].swiglu(gate_up)
    d_gate_up, d_scale, scaled_h = BACKENDS[backend].swiglu_backward(gate_up, grad, scale, want_h=True)

    gu, s = gate_up.clone().requires_grad_(), scale.clone().requires_grad_()
    ref_h = F.silu(gu[:, :300]) * gu[:, 300:]
    (ref_h * s[:, None] * grad).sum().backward()
    assert max_diff(h, ref_h) < 1e-5
    assert max_diff(scaled_h, ref_h * s[:, None]) < 1e-5
    assert max_diff(d_gate_up, gu.grad) < 1e-5
    assert max_diff(d_scale, s.grad) < 1e-5


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_backward_can_write_the_gate_up_gradient_over_gate_up(backend, fuse, dtype):
    """``overwrite_gate_up`` (the compiled layers' backward op): the gate/up gradient lands in ``gate_up``'s own
    storage and every gradient equals the run that allocates it (fp32 included, where the torch chunks read
    ``gate_up`` through views of what they overwrite)."""
    from fmsaccel_moe.ops import sorted_weights, swiglu_down_backward

    gen = torch.Generator().manual_seed(6)
    tokens, experts, top_k, hidden, inter = 23, 5, 2, 16, 40
    routing = route(_routing(tokens, experts, top_k, seed=3), experts)
    gate_up = torch.randn(tokens * top_k, 2 * inter, generator=gen).to(DEVICE, dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) * 0.2).to(DEVICE, dtype)
    top_k_weights = torch.rand(tokens, top_k, generator=gen).to(DEVICE, dtype)
    weights = sorted_weights(top_k_weights, routing.slot)
    d_out = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    kwargs = dict(routing=routing, weights=weights, backend=BACKENDS[backend], fuse=fuse, want_down=True)
    want = swiglu_down_backward(d_out, gate_up.clone(), down, **kwargs)
    got = swiglu_down_backward(d_out, gate_up, down, **kwargs, overwrite_gate_up=True)
    assert got[0].data_ptr() == gate_up.data_ptr()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _mixtral_experts(hidden: int, inter: int, experts: int, dtype) -> MixtralExperts:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
    config._experts_implementation = "eager"  # Hugging Face's per-expert loop: the reference
    module = MixtralExperts(config)
    torch.nn.init.normal_(module.gate_up_proj, std=0.2)
    torch.nn.init.normal_(module.down_proj, std=0.2)
    return module.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype,fuse_swiglu", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, None)])
def test_routed_experts_match_huggingface_experts(backend, dtype, fuse_swiglu):
    """Forward and every gradient (tokens, routing weights, both expert weights) against HF's loop."""
    torch.manual_seed(0)
    experts = _mixtral_experts(hidden=24, inter=20, experts=6, dtype=dtype)
    x = torch.randn(31, 24, dtype=dtype, device=DEVICE, requires_grad=True)
    logits = torch.randn(31, 6, device=DEVICE, requires_grad=True)
    grad = torch.randn(31, 24, dtype=dtype, device=DEVICE)

    def run(fn):
        weights, index = logits.softmax(-1).topk(3, dim=-1)
        out = fn(x, index, weights)
        grads = torch.autograd.grad(out, [x, logits, experts.gate_up_proj, experts.down_proj], grad)
        return out, grads

    ref, ref_grads = run(experts)
    out, grads = run(lambda *a: routed_experts(*a, experts.gate_up_proj, experts.down_proj, backend=backend,
                                               fuse_swiglu=fuse_swiglu))
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert max_diff(out, ref) <= tol * ref.abs().max().item()
    for got, want in zip(grads, ref_grads, strict=True):
        assert max_diff(got, want) <= 2 * tol * want.abs().max().item()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("fuse_swiglu", [True, False])
def test_custom_op_experts_equal_the_autograd_functions(backend, fuse_swiglu):
    """``graph_ops`` (what a compiled layer runs) == ``routed_experts``, forward and every gradient, partial ones
    too; ``opcheck`` checks the fake (shape-only) implementations and the autograd registration."""
    from fmsaccel_moe.graph_ops import _forward, routed_experts_op

    torch.manual_seed(2)
    experts = _mixtral_experts(hidden=24, inter=20, experts=6, dtype=torch.float32)
    x = torch.randn(29, 24, device=DEVICE, requires_grad=True)
    logits = torch.randn(29, 6, device=DEVICE, requires_grad=True)
    grad = torch.randn(29, 24, device=DEVICE)
    leaves = [x, logits, experts.gate_up_proj, experts.down_proj]

    def run(fn, wrt):
        weights, index = logits.softmax(-1).topk(3, dim=-1)
        out = fn(x, index, weights, experts.gate_up_proj, experts.down_proj)
        return out, torch.autograd.grad(out, wrt, grad)

    ref, ref_grads = run(lambda *a: routed_experts(*a, backend=backend, fuse_swiglu=fuse_swiglu), leaves)
    out, grads = run(lambda *a: routed_experts_op(*a, backend, fuse_swiglu), leaves)
    assert max_diff(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert max_diff(got, want) < 1e-5 * max(1.0, want.abs().max().item())
    _, (d_x,) = run(lambda *a: routed_experts_op(*a, backend, fuse_swiglu), [x])  # frozen experts: LoRA elsewhere
    assert max_diff(d_x, ref_grads[0]) < 1e-5 * max(1.0, ref_grads[0].abs().max().item())
    weights, index = logits.softmax(-1).topk(3, dim=-1)
    out = routed_experts_op(x, index, weights, experts.gate_up_proj, experts.down_proj, backend, fuse_swiglu)
    torch.autograd.grad(out, leaves, grad, retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):  # its saved gate_up now holds the gradient
        torch.autograd.grad(out, leaves, grad)

    weights, index = logits.detach().softmax(-1).topk(3, dim=-1)
    inputs = (x.detach().requires_grad_(), index, weights.requires_grad_(), experts.gate_up_proj.detach(),
              experts.down_proj.detach().requires_grad_(), backend, fuse_swiglu)
    torch.library.opcheck(_forward, inputs, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_expert_lora_equals_dense_delta(backend):
    """Low-rank rows inside the grouped GEMMs == experts with W + scale * B @ A, gradients included."""
    torch.manual_seed(1)
    experts, rank, scale = 4, 3, 0.5
    base = _mixtral_experts(hidden=16, inter=12, experts=experts, dtype=torch.float32)
    lora = {
        name: ExpertLoRA(
            a=(torch.randn(experts, rank, w.size(2), device=DEVICE) * 0.3).requires_grad_(),
            b=(torch.randn(experts, w.size(1), rank, device=DEVICE) * 0.3).requires_grad_(),
            scale=scale,
        )
        for name, w in (("gate_up_proj", base.gate_up_proj), ("down_proj", base.down_proj))
    }
    x = torch.randn(17, 16, device=DEVICE, requires_grad=True)
    weights, index = torch.randn(17, experts, device=DEVICE).softmax(-1).topk(2, dim=-1)
    leaves = [x, *(t for f in lora.values() for t in (f.a, f.b))]

    out = routed_experts(
        x, index, weights, base.gate_up_proj, base.down_proj, backend=backend,
        lora_gate_up=lora["gate_up_proj"], lora_down=lora["down_proj"],
    )
    grads = torch.autograd.grad(out.square().sum(), leaves)

    dense = {n: getattr(base, n) + f.scale * torch.bmm(f.b, f.a) for n, f in lora.items()}
    ref = routed_experts(x, index, weights, dense["gate_up_proj"], dense["down_proj"], backend="grouped_mm")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    assert max_diff(out, ref) < 1e-4
    for got, want in zip(grads, ref_grads, strict=True):
        assert max_diff(got, want) < 1e-4 * max(1.0, want.abs().max().item())


def test_routing_has_no_data_dependent_shapes():
    """``route`` runs on fake tensors without a shape environment: no op in it has an output shape that depends on
    values, which on CUDA means a host sync in every MoE layer (``bincount`` was one, s11c2). Same groups as a
    per-expert count."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    index = _routing(37, 6, 2, seed=4, skip_expert=3)
    with FakeTensorMode() as mode:
        assert route(mode.from_tensor(index.cpu()), 6).ends.shape == (6,)
    want = torch.tensor([(index == e).sum().item() for e in range(6)])
    routing = route(index, 6)
    assert torch.equal(routing.counts.cpu(), want) and torch.equal(routing.ends.cpu(), want.cumsum(0))


@pytest.mark.parametrize("experts,top_k", [(40, 8), (8, 2), (5, 2), (128, 8)])
def test_warm_up_token_counts_reach_every_compiled_variant(experts, top_k):
    """Before training, the Triton kernels run at counts covering both row-tile heights and token counts divisible by
    16 and not, so no training step meets a kernel variant for the first time (a 10 s autotune mid-run, s11c6)."""
    counts = triton_kernels.warm_up_token_counts(experts, top_k)
    heights = {triton_kernels.row_block(t * top_k, experts) for t in counts}
    assert heights == {64, 128}
    assert {t % 16 == 0 for t in counts} == {True, False}
    assert all(t >= 16 for t in counts)


@pytest.mark.parametrize("router_dtype", [torch.bfloat16, torch.float32])
def test_kernels_get_fp32_routing_weights_whatever_the_router_hands_over(monkeypatch, router_dtype):
    """Routers give their weights in the model's dtype (bf16 for Granite and Mixtral) or in fp32; the kernels always
    get fp32 ones, the dtype the warm-up tunes. Another dtype is another Triton compilation, met mid-run at the first
    batch long enough for tall row tiles (s12c1: a 2.8 s step after the warm-up). The graph op and the autograd
    functions alike, forward and backward, with the same numbers."""
    from fmsaccel_moe.graph_ops import routed_experts_op

    seen = []
    for name in ("expert_mm", "expert_xty", "swiglu_backward"):
        original = getattr(torch_kernels, name)

        def spy(*args, _original=original, **kwargs):
            scale = kwargs.get("row_scale", kwargs.get("a_row_scale", args[2] if len(args) > 2 else None))
            if isinstance(scale, torch.Tensor):
                seen.append(scale.dtype)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch_kernels, name, spy)
    torch.manual_seed(3)
    experts = _mixtral_experts(hidden=16, inter=12, experts=5, dtype=torch.float32)
    x = torch.randn(11, 16, device=DEVICE, requires_grad=True)
    logits = torch.randn(11, 5, device=DEVICE, requires_grad=True)
    outputs = []
    autograd_functions = lambda *a: routed_experts(*a, backend="grouped_mm")  # noqa: E731
    custom_ops = lambda *a: routed_experts_op(*a, "grouped_mm", True)  # noqa: E731
    for fn in (autograd_functions, custom_ops):
        weights, index = logits.softmax(-1).topk(2, dim=-1)
        out = fn(x, index, weights.to(router_dtype), experts.gate_up_proj, experts.down_proj)
        outputs.append((out, *torch.autograd.grad(out.square().sum(), [x, logits])))
    assert len(seen) >= 6 and set(seen) == {torch.float32}, seen
    for got, want in zip(*outputs, strict=True):
        assert max_diff(got, want) < 1e-5 * max(1.0, want.abs().max().item())


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, and their peak (views of ``inputs`` are
    not new storage)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.live, self.now, self.peak = {t.untyped_storage().data_ptr(): 0 for t in inputs}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.live[key] = size
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def test_torch_swiglu_and_its_gradient_hold_fp32_temporaries_of_one_row_chunk(monkeypatch):
    """The grouped_mm backend's SwiGLU and SwiGLU gradient compute in fp32 one chunk of rows at a time: beyond their
    outputs they hold a few chunk-sized temporaries, not ~20 batch-sized ones (mixtral, LoRA, s12c3: 1.37x plain
    transformers' memory), and give the same bits as the whole batch at once."""
    rows, inter, chunk_rows = 1000, 40, 64
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter, generator=gen).to(torch.bfloat16)
    grad = torch.randn(rows, inter, generator=gen).to(torch.bfloat16)
    scale = torch.rand(rows, generator=gen)
    whole = (torch_kernels.swiglu_rows(gate_up), *torch_kernels.swiglu_backward(gate_up, grad, scale, want_h=True))
    monkeypatch.setattr(torch_kernels, "CHUNK_ELEMENTS", chunk_rows * inter)
    chunk_bytes = chunk_rows * inter * 4
    with _LiveBytes(gate_up) as forward:
        h = torch_kernels.swiglu_rows(gate_up)
    with _LiveBytes(gate_up, grad, scale) as backward:
        chunked = torch_kernels.swiglu_backward(gate_up, grad, scale, want_h=True)
    assert forward.peak <= h.nbytes + 3 * chunk_bytes
    outputs = sum(t.nbytes for t in chunked)
    assert backward.peak <= outputs + 12 * chunk_bytes < outputs + 4 * rows * inter * 4
    for got, want in zip((h, *chunked), whole, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backend_runs_swiglu_as_the_triton_row_kernels_on_cuda(monkeypatch, dtype):
    """On CUDA (``elementwise_in_triton``) the grouped_mm backend's SwiGLU and SwiGLU gradient are the Triton row
    kernels: one pass, no fp32 temporaries (s13c1: mixtral LoRA 1.048x plain's peak with the torch chunks). Forced
    here on the interpreter: the same numbers as the torch chunks, and a whole MoE layer's outputs and gradients too."""
    rows, inter = 83, 24
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(rows, 2 * inter, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(rows, inter, generator=gen).to(DEVICE, dtype)
    scale = torch.rand(rows, generator=gen).to(DEVICE)
    in_torch = (torch_kernels.swiglu(gate_up), *torch_kernels.swiglu_backward(gate_up, grad, scale, want_h=True),
                *torch_kernels.swiglu_backward(gate_up, grad, None)[:1])
    config = MixtralConfig(hidden_size=16, intermediate_size=inter, num_local_experts=5, num_experts_per_tok=2)
    experts = MixtralExperts(config).to(DEVICE, dtype)
    for weight in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(weight, std=0.2)
    x = torch.randn(29, 16, generator=gen).to(DEVICE, dtype)

    def layer():
        x_ = x.clone().requires_grad_()
        weights, index = torch.randn(29, 5, generator=torch.Generator().manual_seed(4)).softmax(-1).topk(2, -1)
        out = routed_experts(x_, index.to(DEVICE), weights.to(DEVICE, dtype), experts.gate_up_proj,
                             experts.down_proj, backend="grouped_mm", fuse_swiglu=False)
        out.float().square().sum().backward()
        grads = [x_.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
        experts.zero_grad()
        return [out, *grads]

    layer_in_torch = layer()
    calls = []
    for name in ("swiglu", "swiglu_backward"):
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    monkeypatch.setattr(torch_kernels, "elementwise_in_triton", lambda t: True)
    in_triton = (torch_kernels.swiglu(gate_up), *torch_kernels.swiglu_backward(gate_up, grad, scale, want_h=True),
                 *torch_kernels.swiglu_backward(gate_up, grad, None)[:1])
    assert calls == ["swiglu", "swiglu_backward", "swiglu_backward"]
    for got, want in zip(in_triton, in_torch, strict=True):
        assert got.dtype == want.dtype and max_diff(got, want) <= TOL[dtype] * want.abs().max().item()
    for got, want in zip(layer(), layer_in_torch, strict=True):
        assert max_diff(got, want) <= 2 * TOL[dtype] * want.abs().max().item()
    assert "swiglu_backward" in calls[3:]


def test_the_experts_backward_frees_the_activation_gradient_before_the_down_weight_gradient(monkeypatch):
    """The gradient of the down projection's input (``[rows, intermediate]``) is dead once the SwiGLU gradient is
    made: freed before the down weight's gradient is computed, the backward's peak holds one such tensor fewer (the
    alive one is about 0.2 GiB at the mixtral shape)."""
    from fmsaccel_moe.ops import swiglu_down_backward

    tokens, experts, hidden, inter, top_k = 96, 4, 8, 40, 2
    gen = torch.Generator().manual_seed(5)
    routing = route(_routing(tokens, experts, top_k), experts)
    gate_up = torch.randn(tokens * top_k, 2 * inter, generator=gen).to(DEVICE)
    down = torch.randn(experts, hidden, inter, generator=gen).to(DEVICE)
    weights = torch.rand(tokens * top_k, generator=gen).to(DEVICE)
    d_out = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    live_at_down_gradient = []
    expert_xty = torch_kernels.expert_xty

    def recording_xty(*args, **kwargs):
        live_at_down_gradient.append(tracker.now)
        return expert_xty(*args, **kwargs)

    monkeypatch.setattr(torch_kernels, "expert_xty", recording_xty)
    with _LiveBytes(gate_up, down, weights, d_out) as tracker:
        d_gate_up, _, d_weights = swiglu_down_backward(d_out, gate_up, down, routing=routing, weights=weights,
                                                       backend=torch_kernels, fuse=False, want_down=True)
    scaled_h = tokens * top_k * inter * 4
    assert live_at_down_gradient == [d_gate_up.nbytes + d_weights.nbytes + scaled_h]


@pytest.mark.parametrize("tokens,experts,top_k,empty", [(37, 6, 2, (3,)), (40, 40, 8, (0, 39)), (5, 128, 8, ()),
                                                        (90, 5, 1, (0, 4)), (3, 8, 2, ()), (0, 6, 2, ())])
def test_routing_kernels_equal_the_torch_routing(tokens, experts, top_k, empty):
    """What ``route`` and ``Routing.blocks`` do on CUDA (two Triton launches) equals their torch code: the int32 rows,
    group counts and ends (with empty experts first, in the middle and last), and the tile map at every tile
    height."""
    from fmsaccel_moe.routing_kernels import route_metadata, tile_map

    scores = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    scores[:, list(empty)] = -1.0
    index = scores.topk(top_k, dim=-1).indices.to(DEVICE)
    want = route(index, experts)
    assert all(want.counts[e] == 0 for e in empty)
    for keys in (torch.int64, torch.int32, torch.uint8):  # route() sorts one-byte keys on CUDA
        got = route_metadata(*torch.sort(index.reshape(-1).to(keys), stable=True), experts, top_k)
        for name, g in zip(("expert", "slot", "token", "counts", "ends"), got, strict=True):
            w = getattr(want, name)
            assert g.dtype == w.dtype and torch.equal(g, w), (name, keys)
            # own allocations, as the backward's: a view at an offset is another alignment for Triton to specialise on
            assert g.storage_offset() == 0, name
    for block_m in (16, 64, 128):
        for g, w in zip(tile_map(got[4], want.num_rows, block_m), want.blocks(block_m), strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), block_m


def test_routing_kernels_check_themselves_against_torch(monkeypatch):
    """The check the plugin runs on the GPU before training (under the interpreter here): true for these kernels, false
    for a broken one, which the plugin then turns off, loudly."""
    from fmsaccel_moe import plugin, routing, routing_kernels
    from fmsaccel_moe.backend import ExpertShape

    assert routing_kernels.agrees_with_torch(DEVICE, 10, 3)
    broken = routing_kernels.route_metadata

    def off_by_one(*args):
        expert, slot, token, counts, ends = broken(*args)
        return expert, slot, token, counts, ends + 1

    monkeypatch.setattr(routing_kernels, "route_metadata", off_by_one)
    assert not routing_kernels.agrees_with_torch(DEVICE, 10, 3)
    monkeypatch.setattr(routing, "KERNELS", True)
    ctx = TrainContext(args={})
    plugin._check_routing_kernels({ExpertShape(10, 8, 6, 3, torch.float32)}, ctx, "accelerated-moe", DEVICE)
    assert routing.KERNELS is False
    assert any("routing kernels off" in note for _, note in ctx.report.notes)


class _LaunchSignatures:
    """Stands in for a Triton kernel and records what Triton compiles a variant for at each launch: the constexpr
    values, each tensor's dtype and 16-byte alignment, each specialised integer's ==1 and %16 (as Triton does)."""

    def __init__(self, kernel, seen: set):
        self.fn, self.seen = kernel, seen  # .fn: `interpreting()` looks through it, as through an autotuner

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            names = self.fn.arg_names
            # the jit's do_not_specialize (an interpreted kernel keeps it in .kwargs)
            skip = set(getattr(self.fn, "do_not_specialize", None) or self.fn.kwargs.get("do_not_specialize") or ())
            parts = []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    parts.append((str(a.dtype), a.data_ptr() % 16 == 0))
                elif isinstance(a, int) and not isinstance(a, bool) and names[i] not in skip and i not in skip:
                    parts.append((a == 1, a % 16 == 0))
            self.seen.add((self.fn.__name__, tuple(parts), tuple(sorted(constexprs.items()))))
            return self.fn[grid](*args, **constexprs)

        return launch


@pytest.mark.parametrize("backend,fuse", [("triton", True), ("triton", False), ("grouped_mm", False)])
def test_the_warm_up_meets_every_kernel_variant_a_compiled_layer_runs(monkeypatch, backend, fuse):
    """Every Triton kernel variant a training step of a compiled layer launches (the custom ops, with a router that
    hands over bf16 weights, experts trainable or frozen) was already launched by the warm-up before training: the
    same constexprs, argument dtypes and pointer alignments. A variant met first in training compiles and autotunes
    mid-run (s11c6: 10.6 s; s12c1: 2.8 s, bf16 routing weights against the warm-up's fp32). Row-tile heights are
    covered by ``warm_up_token_counts`` (the interpreter runs one height). The grouped_mm backend launches only the
    SwiGLU row kernels, on CUDA (forced here)."""
    from fmsaccel_moe import ops
    from fmsaccel_moe.backend import ExpertShape, warm_up_triton
    from fmsaccel_moe.graph_ops import routed_experts_op

    seen: set = set()
    for name in ("_expert_mm_kernel", "_expert_xty_kernel", "_swiglu_kernel", "_swiglu_backward_kernel"):
        monkeypatch.setattr(triton_kernels, name, _LaunchSignatures(getattr(triton_kernels, name), seen))
    monkeypatch.setattr(ops, "FUSE_SWIGLU_MAX_HIDDEN", 16 if fuse else 8)  # hidden 16: fused or not
    shape = ExpertShape(num_experts=4, hidden=16, intermediate=8, top_k=2, dtype=torch.bfloat16)
    monkeypatch.setattr(triton_kernels, "TALL_TILES_FROM_ROWS_PER_EXPERT", 8)  # small warm-up counts
    monkeypatch.setattr(torch_kernels, "elementwise_in_triton", lambda t: True)
    warm_up_triton({shape}, DEVICE, backend=backend)
    warmed, seen_in_training = set(seen), seen
    seen_in_training.clear()
    gen = torch.Generator().manual_seed(1)
    for frozen in (False, True):
        gate_up = (torch.randn(4, 16, 16, generator=gen) * 0.25).to(DEVICE, torch.bfloat16).requires_grad_(not frozen)
        down = (torch.randn(4, 16, 8, generator=gen) * 0.3).to(DEVICE, torch.bfloat16).requires_grad_(not frozen)
        for tokens in (21, 32):
            x = torch.randn(tokens, 16, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
            logits = torch.randn(tokens, 4, generator=gen).to(DEVICE).requires_grad_()
            weights, index = logits.softmax(-1).topk(2, dim=-1)
            out = routed_experts_op(x, index, weights.to(torch.bfloat16), gate_up, down, backend,
                                    ops.fuse_swiglu_for(down, None))
            out.float().square().sum().backward()
    assert seen_in_training and seen_in_training <= warmed, sorted(seen_in_training - warmed)
