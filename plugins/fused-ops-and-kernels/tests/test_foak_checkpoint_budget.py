"""activation_budget_gib: each step un-checkpoints its last decoder layers while their activations fit the budget."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE, build_plugin, padding_free_lora_model, tiny_model, train_step

from fmsaccel_aadp.collator import collate_padding_free
from fmsaccel_foak.checkpointing import layers_to_keep, saved_bytes_per_token
from fmsaccel_framework.plugin import PluginError


def _model(layers: int = 4, dtype=torch.float32, checkpointing: bool = True, base_layer=None, **keys):
    return padding_free_lora_model(base_layer, checkpointing, layers, dtype, **keys)


def _batch(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    batch = collate_padding_free([{"input_ids": torch.randint(0, 128, (n,), generator=g).tolist()} for n in lengths])
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _layers(model):
    return list(model.get_base_model().model.layers)


def _record_checkpointing(model) -> list[bool]:
    """Each decoder layer's checkpointing flag when it runs (appended in call order).

    While checkpointing is on for the model, the layer's fused LoRA forwards keep their
    dequantised weights exactly when the layer is checkpointed.
    """
    seen: list[bool] = []
    decoder = model.get_base_model().model

    def record(layer, args):
        seen.append(bool(layer.gradient_checkpointing))
        fused = [m._foak_keep_weights for m in layer.modules() if "_foak_keep_weights" in m.__dict__]
        assert fused and (set(fused) == {seen[-1]} or not decoder.gradient_checkpointing)

    for layer in _layers(model):
        layer.register_forward_pre_hook(record)
    return seen


def test_layers_to_keep():
    assert layers_to_keep(32, 1000, 10_000_000, 1000) == 10
    assert layers_to_keep(32, 100, 10_000_000, 1000) == 32  # capped at the layer count
    assert layers_to_keep(32, 20_000, 10_000_000, 1000) == 0
    assert layers_to_keep(4, 0, 1, 1000) == 4


@pytest.mark.parametrize("base_layer", [None, "bitsandbytes"])
def test_short_steps_run_their_last_layers_unchecked_with_the_same_gradients(base_layer):
    """The plan follows each step's token count; the loss and LoRA gradients equal full checkpointing."""
    per_token = saved_bytes_per_token(tiny_model("llama").config)
    budget_gib = 2 * 40 * per_token / 2**30  # two layers at 40 tokens, four at 20, one at 80
    model, ctx = _model(base_layer=base_layer, activation_budget_gib=budget_gib)
    full, _ = _model(base_layer=base_layer)
    assert "the last layers unchecked per step" in "\n".join(ctx.report.lines())
    seen = _record_checkpointing(model)
    for lengths, plan in [((25, 15), [True, True, False, False]), ((12, 8), [False] * 4),
                          ((50, 30), [True, True, True, False]), ((25, 15), [True, True, False, False])]:
        seen.clear()
        batch = _batch(lengths)
        got_loss, got = train_step(model, batch)
        want_loss, want = train_step(full, batch)
        assert seen == plan, lengths
        torch.testing.assert_close(got_loss, want_loss)
        assert got.keys() == want.keys() and len(got) == 32
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("budget", [None, 1e-9])
def test_uncheckpointed_layers_run_unchecked_every_step(budget):
    """``uncheckpointed_layers``: the last layers whatever the length; a budget can add more, never fewer."""
    model, ctx = _model(uncheckpointed_layers=1, activation_budget_gib=budget)
    full, _ = _model()
    assert "the last 1 of 4 layers never checkpointed" in "\n".join(ctx.report.lines())
    seen = _record_checkpointing(model)
    for lengths in ((25, 15), (50, 30)):
        seen.clear()
        batch = _batch(lengths)
        got_loss, got = train_step(model, batch)
        want_loss, want = train_step(full, batch)
        assert seen == [True, True, True, False], lengths
        torch.testing.assert_close(got_loss, want_loss)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)


def test_negative_layer_counts_are_refused():
    for key in ("uncheckpointed_layers", "selective_checkpointing"):
        with pytest.raises(PluginError, match=f"{key} counts decoder layers"):
            build_plugin("training.fused_ops_and_kernels", **{key: -1})


def test_evaluation_and_disabled_checkpointing_are_left_alone():
    per_token = saved_bytes_per_token(tiny_model("llama").config)
    model, _ = _model(activation_budget_gib=100 * 40 * per_token / 2**30)  # every layer fits
    seen = _record_checkpointing(model)
    batch = _batch((25, 15))
    train_step(model, batch)
    assert seen == [False] * 4
    model.eval()
    seen.clear()
    with torch.no_grad():
        model(**batch, use_cache=False)
    assert all(layer.gradient_checkpointing for layer in _layers(model))  # restored; eval does not release
    model.gradient_checkpointing_disable()
    train_step(model, batch)
    train_step(model, batch)
    assert not any(layer.gradient_checkpointing for layer in _layers(model))


@pytest.mark.parametrize("dropout_in_kernel", [False, True])
def test_estimate_bounds_what_a_patched_layer_saves(dropout_in_kernel):
    """The per-token estimate is at least what an unchecked layer keeps for its backward, and not far above it
    (with ``dropout_in_kernel`` the layer keeps no dropout masks, and the estimate counts none)."""
    shape = dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2)
    lengths = (40, 24)
    tokens = sum(lengths)

    def saved(layers: int) -> int:
        model, _ = _model(layers, torch.bfloat16, checkpointing=False, shape=shape,
                          dropout_in_kernel=dropout_in_kernel)
        params = {p.data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):  # the CPU attention's [tokens, tokens] weights are left out: GPU kernels keep none
            if t.data_ptr() not in params and tuple(t.shape[-2:]) != (tokens, tokens):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**_batch(lengths), use_cache=False)
        return sum(storages.values())

    measured = (saved(3) - saved(1)) / 2 / tokens
    estimate = saved_bytes_per_token(tiny_model("llama", **shape).config, dropout_masks=not dropout_in_kernel)
    above = 1.6 if dropout_in_kernel else 1.5  # the margin is a fixed few tensors: more against a layer keeping less
    assert measured <= estimate <= above * measured, (measured, estimate)


def test_budget_must_be_positive():
    with pytest.raises(PluginError, match="activation_budget_gib must be a positive number"):
        build_plugin(activation_budget_gib=0)


def test_budget_without_checkpointing_says_it_is_unused():
    _, ctx = _model(checkpointing=False, activation_budget_gib=1.0)
    assert "activation_budget_gib unused: gradient checkpointing is off" in "\n".join(ctx.report.lines())


def test_budget_under_fsdp_checkpointing_says_it_is_unused():
    """FSDP's own wrapper checkpoints the layers (transformers' flags are off): nothing to steer."""
    from types import SimpleNamespace

    from fmsaccel_cli.distributed import apply_to_sft_config
    from fmsaccel_framework.plugin import TrainContext

    for fsdp, unused in (({}, True), ({"activation_checkpointing": None}, True),
                         ({"activation_checkpointing": False}, False)):  # false keeps transformers' checkpointing
        args = {"gradient_checkpointing": True, "distributed": {"strategy": "fsdp", "fsdp": fsdp}}
        sft_kwargs = {"gradient_checkpointing": True}
        apply_to_sft_config(sft_kwargs, args)  # the SFTConfig the run builds (the FSDP checkpointing rule)
        ctx = TrainContext(args=args, sft_config=SimpleNamespace(**sft_kwargs))
        model = tiny_model("llama")
        model.gradient_checkpointing_enable()
        build_plugin(activation_budget_gib=1.0).prepare_trainer(type("Trainer", (), {"model": model})(), ctx)
        assert ("activation_budget_gib unused under FSDP" in "\n".join(ctx.report.lines())) is unused, fsdp
