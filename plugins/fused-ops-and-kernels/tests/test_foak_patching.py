"""The rule table applied to tiny models of every supported architecture gives the unpatched logits and gradients."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE, VOCAB, quantize_decoder, tiny_model
from foak_testing import build_plugin as build
from peft import LoraConfig, get_peft_model

from fmsaccel_foak import ops
from fmsaccel_foak.spec import FOAK
from fmsaccel_framework.plugin import PluginError, TrainContext

PATH = "training.fused_ops_and_kernels"
DENSE = ["llama", "mistral", "qwen2", "qwen3", "granite"]
MOE = ["mixtral", "granitemoe"]
# PEFT's dropout and the fused op's masks draw the same numbers from torch's CPU generator, not on CUDA (other
# Philox offsets): the checkpointing tests compare with PEFT with dropout on the CPU, without it on a GPU
SAME_STREAM_DROPOUT = 0.1 if DEVICE == "cpu" else 0.0
ALL_KERNELS = dict(fast_rms_layernorm=True, fast_rope_embeddings=True, fast_swiglu=True, fast_loss="fused_ce_liger")


@pytest.fixture
def calls(monkeypatch):
    """Count the fused ops the patched model really calls (a patch that is never reached must not pass)."""
    counts: dict[str, int] = {}
    for name in ("rms_norm", "rope", "swiglu", "swiglu_packed", "cross_entropy", "token_logprobs", "fused_lora"):
        original = getattr(ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return counts


def _batch(seed: int = 0, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def _step(model, **inputs):
    """Loss and the gradients of everything trainable, after one forward/backward in train mode."""
    model.train()
    model.zero_grad()
    torch.manual_seed(11)  # LoRA dropout masks
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, atol=1e-5):
    got_loss, got_grads = got
    want_loss, want_grads = want
    torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=atol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_kernels_match_unpatched(arch, calls):
    """Full fine-tuning: RMSNorm, RoPE, SwiGLU and the chunked linear+CE loss; eval logits unchanged."""
    model = tiny_model(arch)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    want_logits = model.eval()(input_ids=ids).logits
    ctx = TrainContext(args={})
    model = build(**ALL_KERNELS).augment(model, ctx)
    _assert_same(_step(model, input_ids=ids, labels=labels), want)
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, want_logits, atol=1e-5, rtol=1e-5)
    swiglu = "swiglu_packed" if arch in MOE else "swiglu"
    assert {"rms_norm", "rope", swiglu, "token_logprobs"} <= calls.keys()
    assert ctx.report.count("fused-ops-and-kernels") >= 4


@pytest.mark.parametrize("arch", ["llama", "granite"])
def test_fast_loss_triton_cross_entropy(arch, calls):
    """fast_loss: true keeps the logits and swaps the model's loss_function (Granite: on scaled logits)."""
    model = tiny_model(arch)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    model = build(fast_loss=True).augment(model, TrainContext(args={}))
    _assert_same(_step(model, input_ids=ids, labels=labels), want)
    assert calls.get("cross_entropy") == 1


def test_moe_router_aux_loss_is_kept(calls):
    model = tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.1)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    model = build(fast_loss="fused_ce_liger").augment(model, TrainContext(args={}))
    _assert_same(_step(model, input_ids=ids, labels=labels), want)


def _lora(model, targets, dropout: float = 0.1):
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("arch,base_layer", [(a, None) for a in DENSE + MOE]
                         + [("llama", "bitsandbytes"), ("llama", "auto_gptq")])
def test_fused_lora_matches_peft(arch, base_layer, calls):
    """LoRA (dropout 0.1) on attention, and the MLP of dense models, with every kernel on."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + ([] if arch in MOE else ["gate_proj", "up_proj"])
    model = _lora(quantize_decoder(tiny_model(arch), base_layer), targets)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    ctx = TrainContext(args={"gradient_checkpointing": False})
    model = build(base_layer=base_layer, fused_lora=True, **ALL_KERNELS).augment(model, ctx)
    _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5)
    layers = 2
    assert calls["fused_lora"] == layers * (2 if arch in MOE else 4)  # qkv + o (+ gate/up + down)
    assert not any("outside the rule table" in note for _, note in ctx.report.notes)


def test_packed_position_ids_match_unpatched(calls):
    """Padding-free packing: positions restart inside a row; the patched RoPE must follow them.

    ``use_cache=False`` as trainers pass it: transformers then masks attention per packed example.
    """
    model = tiny_model("llama")
    ids, labels = _batch(batch=1, seq=14)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]], device=DEVICE)
    inputs = dict(input_ids=ids, labels=labels, position_ids=positions, use_cache=False)
    want = _step(model, **inputs)
    model = build(**ALL_KERNELS).augment(model, TrainContext(args={}))
    _assert_same(_step(model, **inputs), want)
    assert calls["rope"] == 2


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 8},
])
def test_rope_scaling_matches_unpatched(rope_parameters):
    model = tiny_model("llama", rope_parameters=rope_parameters)
    ids, labels = _batch(seq=20)  # longer than original_max_position_embeddings: dynamic scaling kicks in
    want = _step(model, input_ids=ids, labels=labels)
    model = build(fast_rope_embeddings=True).augment(model, TrainContext(args={}))
    _assert_same(_step(model, input_ids=ids, labels=labels), want)


def test_trl_fused_lm_head_protocol():
    """After prepare_trainer, the model answers TRL's ``fused_lm_head=True`` calls like TRL's own fused head."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this trl has no fused LM head")
    ids, labels = _batch()
    reference = tiny_model("granite")
    trl_utils.add_fused_lm_head(reference, outputs=("log_probs", "entropy", "is_top1"))
    reference.train()
    want = reference(input_ids=ids, labels=labels, fused_lm_head=True)
    want.loss.backward()
    model = tiny_model("granite")
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    plugin, ctx = build(fast_loss="fused_ce_liger"), TrainContext(args={})
    model = plugin.augment(model, ctx)
    plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
    model.train()
    got = model(input_ids=ids, labels=labels, fused_lm_head=True)
    got.loss.backward()
    for field in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5, msg=field)
    assert torch.equal(got.is_top1, want.is_top1) and torch.equal(got.label_mask, want.label_mask)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)



# ops whose output shape or value the host must wait for ("index_bool": indexing with a boolean mask)
HOST_WAITS = ("nonzero", "masked_select", "_local_scalar_dense", "item", "index_bool")


@pytest.mark.parametrize("fused_lm_head", [False, True])
def test_the_fused_loss_makes_the_host_wait_for_nothing(fused_lm_head):
    """The fused loss's forward and backward dispatch no op whose output shape or value the host must read.

    Such an op (picking out the labelled rows, reading a count) makes the host wait for the GPU in every step,
    and the GPU idles until the host has queued the next kernels.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            boolean = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
            self.ops.add("index_bool" if boolean else name)
            return func(*args, **(kwargs or {}))

    ids, labels = _batch()
    labels[0, -4:] = -100  # ignored positions inside the batch, not only at its start
    model = build(fast_loss="fused_ce_liger").augment(tiny_model("llama"), TrainContext(args={}))
    model.train()
    with Seen() as seen:
        out = model(input_ids=ids, labels=labels, fused_lm_head=fused_lm_head)
        out.loss.backward()
    assert seen.ops and not seen.ops & set(HOST_WAITS), sorted(seen.ops & set(HOST_WAITS))

def _checkpointed(base_layer, targets, dropout: float = 0.1, args: dict | None = None, **keys):
    """(the patched model under non-reentrant checkpointing, the unpatched model's loss and gradients, the batch,
    the context), for the checkpointing tests; ``args`` adds training arguments."""
    model = _lora(quantize_decoder(tiny_model("llama"), base_layer), targets, dropout)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    ctx = TrainContext(args={"gradient_checkpointing": True, **(args or {})})
    plugin = build(base_layer=base_layer, fused_lora=True, **keys, **ALL_KERNELS)
    model = plugin.augment(model, ctx)
    plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    return model, want, (ids, labels), ctx


@pytest.mark.parametrize("base_layer", [None, "bitsandbytes"])
def test_selective_checkpointing_keeps_gradients(base_layer):
    """Checkpointed layers recompute with the same dropout masks; kept dequantised weights change nothing."""
    model, want, (ids, labels), _ = _checkpointed(base_layer, ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                  selective_checkpointing=True)
    _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5)
    layers = model.get_base_model().model.layers
    assert all(getattr(layer._gradient_checkpointing_func, "_foak_selective", False) for layer in layers)


@pytest.mark.parametrize("base_layer,mlp_lora,selective,runs", [
    ("bitsandbytes", [], False, 1), ("auto_gptq", [], 1, 1),
    (None, ["gate_proj", "up_proj"], False, 1),  # bf16: down_proj's own weight is not a saved tensor
    ("bitsandbytes", ["down_proj"], False, 2),  # down_proj's LoRA saves the SwiGLU output
])
def test_recompute_leaves_out_the_swiglu_output_nothing_saves(base_layer, mlp_lora, selective, runs, monkeypatch):
    """Checkpointed, the SwiGLU kernel runs once per layer: the recompute ends at its saved gate and up.

    Where a later op saves the SwiGLU output, the recompute computes it too. Either way the
    gradients are the unpatched model's; selective checkpointing (here in the last layer
    only) replays the same ops.
    """
    import importlib

    swiglu_op = importlib.import_module("fmsaccel_foak.ops.swiglu")  # the module (ops.swiglu is the function)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", *mlp_lora]
    model, want, (ids, labels), _ = _checkpointed(base_layer, targets, SAME_STREAM_DROPOUT,
                                                  selective_checkpointing=selective)
    launches = []
    original = swiglu_op._launch_forward
    monkeypatch.setattr(swiglu_op, "_launch_forward", lambda *a: launches.append(1) or original(*a))
    _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5 if DEVICE == "cpu" else 1e-4)
    layers = model.get_base_model().model.layers
    assert len(launches) == len(layers) * runs
    assert [layer._gradient_checkpointing_func._foak_selective for layer in layers] == (
        [False, True] if selective else [False, False])


@pytest.mark.parametrize("base_layer,selective", [(None, False), ("bitsandbytes", False), ("bitsandbytes", True)])
def test_offloaded_mlp_activations_skip_the_gate_up_recompute(base_layer, selective, calls):
    """``offload_mlp_activations``: the offloaded layer's recompute takes gate/up back instead of rerunning their op.

    Fused ops per step: 4 per layer in the forward; the recompute reruns q/k/v, o and gate/up
    (the SwiGLU's saved tensors end it), and in the offloaded layer only q/k/v and o. Same
    loss and gradients as the unpatched model, also where the layers keep their attention
    outputs too (selective checkpointing).
    """
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["down_proj"] if base_layer is None else [])
    model, want, (ids, labels), ctx = _checkpointed(base_layer, targets, SAME_STREAM_DROPOUT, offload_mlp_activations=1,
                                                    offload_min_tokens=1, selective_checkpointing=selective)
    assert ("MLP gate/up of 1 layers offloaded to host memory for the recompute (of 2 eligible; steps of 1+ tokens)"
            in "\n".join(ctx.report.lines()))
    calls.clear()
    for _ in range(2):  # the copies are taken once per step
        calls.clear()
        _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5 if DEVICE == "cpu" else 1e-4)
    # a LoRA on down_proj saves the SwiGLU output, so the recompute runs down_proj too
    assert calls["fused_lora"] == 8 + (3 + 2) + (2 if base_layer is None else 0)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    assert "_foak_offload" in mlps[0].__dict__ and "_foak_offload" not in mlps[1].__dict__
    assert not mlps[0]._foak_offload.saved  # taken by the backward



def test_steps_below_offload_min_tokens_recompute_gate_up(calls):
    """A step shorter than ``offload_min_tokens`` copies nothing: every layer's recompute reruns its gate/up op, with
    the unpatched model's loss and gradients; a step at the threshold offloads again. Host buffers are sized for the
    longest step the batch size and sequence length allow."""
    targets, tokens = ["q_proj", "k_proj", "v_proj", "o_proj"], _batch()[0].numel()
    model, want, (ids, labels), _ = _checkpointed("bitsandbytes", targets, SAME_STREAM_DROPOUT,
                                                  {"per_device_train_batch_size": 3, "max_seq_length": 40},
                                                  offload_mlp_activations=1, offload_min_tokens=tokens + 1)
    offloaded = model.get_base_model().model.layers[0].mlp._foak_offload
    assert offloaded.reserve_tokens == 120
    calls.clear()
    _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5 if DEVICE == "cpu" else 1e-4)
    assert calls["fused_lora"] == 8 + 3 + 3 and offloaded.host is None
    offloaded.min_tokens = tokens
    calls.clear()
    _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5 if DEVICE == "cpu" else 1e-4)
    assert calls["fused_lora"] == 8 + 3 + 2 and offloaded.host is not None


def test_pinned_buffers_grow_to_a_power_of_two_of_tokens():
    from fmsaccel_foak.offload import pinned_tokens

    assert [pinned_tokens(n) for n in (1, 2, 3, 3480, 4096, 4097, 6760)] == [1, 2, 4, 4096, 4096, 8192, 8192]


def test_a_buffer_too_large_to_pin_falls_back_to_the_steps_own_size(monkeypatch):
    from fmsaccel_foak import offload

    tried = []

    def empty(numel, dtype, pin_memory):
        tried.append(numel)
        if numel > 100:
            raise RuntimeError("out of pinned memory")
        return torch.zeros(numel, dtype=dtype)

    monkeypatch.setattr(offload.torch, "empty", empty)
    assert offload.pin_buffer([400, 80], torch.bfloat16).numel() == 80 and tried == [400, 80]
    tried.clear()
    with pytest.raises(RuntimeError, match="out of pinned memory"):
        offload.pin_buffer([400, 400], torch.bfloat16)  # one try for a size given twice
    assert tried == [400]


@pytest.mark.parametrize("base_layer,selective", [(None, False), ("bitsandbytes", False), ("bitsandbytes", 1)])
def test_the_recompute_reuses_the_forwards_dropped_down_products(base_layer, selective, monkeypatch):
    """``dropout_in_kernel`` under checkpointing: the forward keeps each projection's ``(x * keep) @ A^T`` for the
    recompute, which replays the same seed on the same input, so that kernel runs once per projection and step,
    with PEFT's loss and gradients (PEFT drawing the kernels' masks)."""
    from foak_testing import use_kernel_masks

    from fmsaccel_foak.ops import lora_dropout

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = _lora(quantize_decoder(tiny_model("llama"), base_layer), targets, 0.1)
    use_kernel_masks(model)
    ids, labels = _batch()
    want = _step(model, input_ids=ids, labels=labels)
    ctx = TrainContext(args={"gradient_checkpointing": True})
    plugin = build(base_layer=base_layer, fused_lora=True, dropout_in_kernel=True, selective_checkpointing=selective,
                   **ALL_KERNELS)
    model = plugin.augment(model, ctx)
    plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    launches = []
    original = lora_dropout.dropped_down
    monkeypatch.setattr(lora_dropout, "dropped_down", lambda *a: launches.append(1) or original(*a))
    multi = lora_dropout.dropped_down_multi  # q/k/v in one launch: one product per projection
    monkeypatch.setattr(lora_dropout, "dropped_down_multi",
                        lambda *a: launches.extend([1] * a[1].shape[0]) or multi(*a))
    for _ in range(2):
        launches.clear()
        _assert_same(_step(model, input_ids=ids, labels=labels), want, atol=2e-5 if DEVICE == "cpu" else 1e-4)
        assert len(launches) == len(targets) * len(model.get_base_model().model.layers)  # the forward's only
    assert not any("_foak_down_product" in m.__dict__ for m in model.modules())  # all taken by the recompute

def test_an_offloaded_layers_copy_waits_for_the_earlier_copies_but_those_of_the_layers_below(monkeypatch):
    """The compute stream waits for every earlier copy to the host before the next one, except the copies of the
    layers directly below (one copy outlasts a layer's forward on the GPU): two in the lower half of the decoder, one
    above; the recompute waits for them all. What is waited for is released."""
    from fmsaccel_foak import offload

    assert offload.copies_left_running(3, 32) == (2, 1) and offload.copies_left_running(16, 32) == (15,)
    waited = []
    monkeypatch.setattr(offload, "_compute_stream_waits_for", waited.append)
    monkeypatch.setattr(offload, "_in_flight", [("copy 3", 3, "g", "u"), ("copy 5", 5, "g", "u")])
    offload.retire_in_flight(keep=(5,))  # layer 6's copy: layer 5, right below it, keeps its copy going
    assert waited == ["copy 3"] and [e[0] for e in offload._in_flight] == ["copy 5"]
    offload.retire_in_flight(keep=(8,))  # layer 9's copy: nothing offloaded right below it
    assert waited == ["copy 3", "copy 5"] and offload._in_flight == []
    offload._in_flight.extend([("copy 1", 1, "g", "u"), ("copy 2", 2, "g", "u")])
    offload.retire_in_flight(keep=offload.copies_left_running(3, 32))  # low in the decoder: both left running
    assert waited == ["copy 3", "copy 5"] and [e[0] for e in offload._in_flight] == ["copy 1", "copy 2"]
    offload._in_flight.clear()
    offload._in_flight.extend([("copy 6", 6, "g", "u"), ("copy 7", 7, "g", "u")])
    offload.retire_in_flight()  # the backward's first recompute
    assert waited[2:] == ["copy 6", "copy 7"] and offload._in_flight == []


def test_a_forward_past_offloaded_layers_frees_their_copies_but_the_one_right_below(monkeypatch):
    """Offloaded layers are chosen among the eligible ones by decoder position; a later layer's MLP forward makes
    the compute stream wait for the copies of the layers below it but those right below (still running), so
    their gate/up are not held through the rest of the forward and the loss."""
    from fmsaccel_foak import offload

    model, _, _, ctx = _checkpointed("bitsandbytes", ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0,
                                     offload_mlp_activations=1)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    assert [m._foak_copies_running for m in mlps] == [(-1, -2), (0,)]  # two layers: the top one is in the upper half
    assert mlps[0]._foak_offload.index == 0 and all("_foak_offload" not in m.__dict__ for m in mlps[1:])
    top = len(mlps) - 1
    waited = []
    monkeypatch.setattr(offload, "_compute_stream_waits_for", waited.append)
    monkeypatch.setattr(offload, "_in_flight", [("older", top - 2, "g", "u"), ("right below", top - 1, "g", "u")])
    with torch.no_grad():
        mlps[top](torch.randn(1, 3, mlps[top].gate_proj.in_features, device=DEVICE))
    assert waited == ["older"] and [e[0] for e in offload._in_flight] == ["right below"]


def test_offloaded_layers_are_spread_over_the_eligible_ones_by_position():
    from torch import nn

    from fmsaccel_foak.offload import offload_layers

    mlps = [nn.Module() if i not in (1, 4) else None for i in range(8)]  # 1 and 4: not eligible
    chosen = offload_layers(mlps, 3)
    assert chosen == [0, 3, 6] and all(mlps[i]._foak_offload.index == i for i in chosen)
    assert [m._foak_offload_below.index if m._foak_offload_below else None for m in mlps if m is not None] == [
        None, 0, 0, 3, 3, 6]  # layers 0, 2, 3, 5, 6, 7: the nearest offloaded one strictly below each
    assert offload_layers(mlps, 5) == [0, 2, 3, 5, 6]  # the top one, whose copies nothing brings back early, spared
    assert offload_layers(mlps, 6) == offload_layers(mlps, 9) == [0, 2, 3, 5, 6, 7]

def test_offload_mlp_activations_needs_the_fused_mlp():
    with pytest.raises(PluginError, match="needs fused_lora: true and fast_swiglu: true"):
        build(fused_lora=True, offload_mlp_activations=2)
    model = _lora(quantize_decoder(tiny_model("llama"), "bitsandbytes"), ["gate_proj", "up_proj", "q_proj"])
    ctx = TrainContext(args={"gradient_checkpointing": True})
    plugin = build(base_layer="bitsandbytes", fused_lora=True, offload_mlp_activations=1, **ALL_KERNELS)
    model = plugin.augment(model, ctx)
    with pytest.raises(PluginError, match="no checkpointed layer has a fused MLP without LoRA on gate/up"):
        plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)


def test_report_lists_every_replacement():
    model = _lora(quantize_decoder(tiny_model("llama"), "bitsandbytes"), ["q_proj", "k_proj", "v_proj", "o_proj"])
    ctx = TrainContext(args={})
    build(base_layer="bitsandbytes", fused_lora=True, **ALL_KERNELS).augment(model, ctx)
    lines = "\n".join(ctx.report.lines())
    for expected in ("LlamaRMSNorm.forward -> triton rms_norm: 5", "apply_rotary_pos_emb -> triton rope",
                     "LlamaAttention q/k/v -> one fused LoRA op: 2", "LlamaAttention o_proj -> fused LoRA op: 2",
                     "LlamaMLP gate/up -> one fused op + triton swiglu, down fused: 2",
                     "LlamaMLP: triton swiglu inside the fused MLP: 2",
                     "LlamaForCausalLM.forward -> chunked fused linear+cross-entropy"):
        assert expected in lines, lines
    assert "LlamaMLP.forward -> triton swiglu" not in lines  # not counted twice


# --- errors --------------------------------------------------------------------------------------------------------
def test_unsupported_architecture_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(PluginError, match=r"fast_rms_layernorm has no rule for architecture 'gpt2'; supported: .*"):
        build(fast_rms_layernorm=True).augment(model, TrainContext(args={}))


def test_fused_lora_needs_lora():
    with pytest.raises(PluginError, match="needs LoRA"):
        build(fused_lora=True).augment(tiny_model("llama"), TrainContext(args={}))


def test_fused_lora_applies_peft_itself():
    """bf16 LoRA: without a quantisation plugin foak adds the adapters, so it can fuse them (TRL then skips PEFT)."""
    ctx = TrainContext(args={}, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = build(fused_lora=True).augment(tiny_model("llama"), ctx)
    assert ctx.peft_config is None and hasattr(model, "get_base_model")


def test_base_layer_mismatch_is_an_error():
    model = _lora(quantize_decoder(tiny_model("llama"), "bitsandbytes"), ["q_proj"])
    with pytest.raises(PluginError, match="base_layer: auto_gptq but the LoRA base layers are bitsandbytes"):
        build(base_layer="auto_gptq", fused_lora=True).augment(model, TrainContext(args={}))


def test_swiglu_on_eager_experts_is_an_error():
    model = tiny_model("mixtral")
    model.set_experts_implementation("eager")
    with pytest.raises(PluginError, match="fast_swiglu .* needs experts_implementation grouped_mm or batched_mm"):
        build(fast_swiglu=True).augment(model, TrainContext(args={}))


def test_one_config_path_only():
    values = {k: v.default for k, v in FOAK.paths[PATH].items()}
    with pytest.raises(PluginError, match="exactly one"):
        FOAK.build({PATH: values, "peft.quantization.fused_ops_and_kernels": values})


def test_forwards_replaced_by_a_later_plugin_are_reported():
    """A later plugin (aadp, moe) that swaps a forward foak installed must not leave the report claiming it."""
    model = tiny_model("mixtral")
    plugin, ctx = build(fast_rms_layernorm=True, fast_swiglu=True), TrainContext(args={})
    model = plugin.augment(model, ctx)
    model.model.norm.forward = lambda x: x
    model.model.layers[0].mlp.experts.forward = lambda *args: args[0]
    plugin.prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
    notes = " ".join(note for _, note in ctx.report.notes)
    assert "1 modules patched by foak (MixtralRMSNorm, ...) got another forward" in notes
    assert "1 MixtralExperts modules got another forward after foak" in notes


@pytest.mark.parametrize("distributed, kept",
                         [(None, True), ({"strategy": "ddp"}, True), ({"strategy": "fsdp"}, False)])
def test_dequantised_weights_kept_for_the_backward_except_under_fsdp(monkeypatch, distributed, kept):
    """Under checkpointing the recompute's weights serve the backward; FSDP runs dequantise again (memory)."""
    from fmsaccel_foak import modules

    seen = []
    for name in ("fused_attention_forward", "fused_mlp_forward"):
        original = getattr(modules, name)

        def spy(*args, _original=original, _position=int(name == "fused_attention_forward"), **kwargs):
            seen.append(args[_position])  # keep_weights (the attention's comes after its modeling module)
            return _original(*args, **kwargs)

        monkeypatch.setattr(modules, name, spy)
    model = _lora(tiny_model("llama"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    args = {"gradient_checkpointing": True, **({"distributed": distributed} if distributed else {})}
    build(fused_lora=True).augment(model, TrainContext(args=args))
    assert seen and set(seen) == {kept}
