"""The plugin end to end on tiny models: augment + report, loss parity, checkpoints, LoRA on experts."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from moe_testing import DEVICE, max_diff, tiny_model
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fmsaccel_framework.plugin import PluginError, TrainContext
from fmsaccel_moe.patch import unpatch_site
from fmsaccel_moe.rules import find_moe_sites
from fmsaccel_moe.spec import MOE

RECIPES = Path(__file__).parents[3] / "recipes" / "framework"
RECIPE = OmegaConf.load(RECIPES / "moe-scattermoe-granite-ep1-padding-free-foak.yaml")


def _plugin(**keys):
    keys = {"ep_degree": 1, "disable_distributed": False, "backend": "auto", **keys}
    return MOE.build({"training.moe.scattermoe": keys})


def _ctx(**args):
    args = {"per_device_train_batch_size": 2, "max_seq_length": 16, **args}
    return TrainContext(args=args, torch_dtype=torch.float32)


def _batch(seed: int, vocab: int = 128, shape=(2, 12)):
    ids = torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def test_augment_patches_every_block_and_reports_it():
    ctx = _ctx()
    model = _plugin().augment(tiny_model("granitemoe"), ctx)
    backend = ctx.extras["moe_backend"]
    assert ctx.report.entries == {("accelerated-moe", f"GraniteMoeExperts.forward -> scattermoe ({backend})"): 2}
    notes = [m for p, m in ctx.report.notes if p == "accelerated-moe"]
    chosen = next(m for m in notes if m.startswith("experts GEMM backend"))
    if torch.cuda.is_available():
        assert "auto: fwd+bwd per layer" in chosen  # both engines timed, the faster one named
    else:
        assert backend == "grouped_mm" and "no GPU" in chosen
    assert any("top-k of the logits, softmax over the k" in m for m in notes)
    assert all(site.experts._fmsaccel_moe.backend == backend for site in find_moe_sites(model))


def test_augment_refuses_a_dense_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(PluginError, match="no rule"):
        _plugin().augment(dense, _ctx())


def test_ep_degree_without_distributed_launch_is_a_clear_error():
    with pytest.raises(PluginError, match="needs a distributed launch"):
        _plugin(ep_degree=2).augment(tiny_model("mixtral"), _ctx())


def _train(model, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        out = model(**_batch(step % 7))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def test_loss_parity_over_50_steps_with_aux_loss():
    """Triton kernels vs Hugging Face's experts, full fine-tuning, load-balancing loss in the loss."""
    reference = tiny_model("mixtral", seed=1, num_hidden_layers=1)  # one layer: the interpreter is slow
    ctx = _ctx(output_router_logits=True, router_aux_loss_coef=0.02)
    patched = _plugin(backend="triton").augment(copy.deepcopy(reference), ctx)
    reference.config.output_router_logits, reference.config.router_aux_loss_coef = True, 0.02
    assert any("load-balancing loss" in m for _, m in ctx.report.notes)

    ref_losses, losses = _train(reference, 50), _train(patched, 50)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 2e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    reference = tiny_model("granitemoe", seed=3)
    model = _plugin(backend="triton").augment(copy.deepcopy(reference), _ctx())
    for m in (model, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        m(**_batch(4)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert max_diff(p.grad, q.grad) < 1e-5, name


def test_saved_checkpoint_has_the_original_layout_and_loads_in_plain_transformers(tmp_path):
    reference = tiny_model("granitemoe", seed=2)
    model = _plugin().augment(copy.deepcopy(reference), _ctx())
    _train(model, 3)
    model.save_pretrained(tmp_path / "patched")
    reference.save_pretrained(tmp_path / "reference")

    from safetensors import safe_open

    def keys(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert keys(tmp_path / "patched") == keys(tmp_path / "reference")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "patched", experts_implementation="eager").to(DEVICE)
    ids = _batch(11)["input_ids"]
    model.eval()
    with torch.no_grad():
        assert max_diff(plain(ids).logits, model(ids).logits) < 1e-5


def _lora_ctx(dropout: float = 0.0):
    from peft import LoraConfig

    ctx = _ctx()
    targets = ["q_proj", "v_proj", "experts"]
    ctx.peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    return ctx


def test_lora_on_experts_matches_peft_and_saves_a_peft_adapter(tmp_path):
    base = tiny_model("mixtral", seed=3)
    ctx = _lora_ctx()
    model = _plugin(backend="triton").augment(copy.deepcopy(base), ctx)
    assert ctx.peft_config is None  # the plugin applied PEFT itself
    lora_entry = ("accelerated-moe", "MixtralExperts gate_up_proj/down_proj -> per-expert LoRA (PEFT)")
    assert ctx.report.entries[lora_entry] == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts" in n and "lora_A" in n for n in trainable)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in trainable)
    _train(model, 4, lr=1e-2)  # lora_B leaves zero

    ids = _batch(5)["input_ids"]
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    peft_path = copy.deepcopy(model)
    for site in find_moe_sites(peft_path):
        unpatch_site(site)  # PEFT's own ParamWrapper forward (dense W + B @ A)
    with torch.no_grad():
        assert max_diff(ours, peft_path(ids).logits) < 1e-5

    model.save_pretrained(tmp_path)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert max_diff(reloaded(ids).logits, ours) < 1e-5


def test_lora_on_experts_refuses_dropout():
    with pytest.raises(PluginError, match="lora_dropout=0"):
        _plugin().augment(tiny_model("qwen3_moe"), _lora_ctx(dropout=0.1))


def test_lora_on_attention_only_leaves_experts_to_trl():
    from peft import LoraConfig

    ctx = _ctx()
    ctx.peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = _plugin().augment(tiny_model("qwen2_moe"), ctx)
    assert ctx.peft_config is not None  # TRL applies it later
    assert not hasattr(model, "peft_config")


def test_moe_with_4bit_qlora_and_lora_on_experts(tmp_path, monkeypatch):
    """bitsandbytes 4-bit model, PEFT applied first as the QLoRA loaders do: the frozen experts go 4-bit
    too, the forward adds the expert LoRA rows to the dequantised experts, the backward dequantises again."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    from fmsaccel_moe.lora import expert_lora_factors, peft_config_for
    from fmsaccel_moe.ops import routed_experts
    from fmsaccel_moe.quantized import QuantizedExpertWeight

    original = tiny_model("mixtral", seed=5)
    original.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": str(DEVICE)}, experts_implementation="eager")
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "experts"])
    model = get_peft_model(model, peft_config_for(model, lora))
    ctx = _ctx()  # the loader consumed the LoRA config
    plugin = _plugin(backend="triton")
    model = plugin.augment(model, ctx)
    plugin.prepare_trainer(types.SimpleNamespace(model=model), ctx)  # re-validates the 4-bit experts
    sites = find_moe_sites(model)
    assert all(type(site.head).__name__ == "ParamWrapper" for site in sites)
    assert ctx.report.entries[("accelerated-moe", "MixtralExperts weights -> 4-bit nf4 (dequantised per use)")] == 2
    experts = sites[0].experts
    assert isinstance(experts.gate_up_proj, QuantizedExpertWeight) and experts.gate_up_proj.packed.dtype == torch.uint8
    full = original.model.layers[0].mlp.experts.gate_up_proj
    assert max_diff(experts.gate_up_proj.dequantize(), full) < 0.15 * full.abs().max().item()  # nf4 error

    losses = _train(model, 4, lr=1e-2)
    assert losses[-1] < losses[0]

    calls = []
    dequantize = QuantizedExpertWeight.dequantize
    monkeypatch.setattr(QuantizedExpertWeight, "dequantize", lambda self: calls.append(self) or dequantize(self))
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 32, generator=gen).to(DEVICE).requires_grad_()  # hidden_size of tiny_model
    weights, index = torch.randn(9, 5, generator=gen).to(DEVICE).softmax(-1).topk(2, dim=-1)
    lora_params = [p for n, p in sites[0].head.named_parameters() if "lora_" in n]
    assert len(lora_params) == 4
    out = sites[0].head(hidden, index, weights)
    assert len(calls) == 2  # forward: gate_up and down
    got = torch.autograd.grad(out.square().sum(), [hidden, *lora_params])
    assert len(calls) == 4  # backward dequantises again instead of keeping 16-bit copies

    factors = expert_lora_factors(sites[0].head)
    ref = routed_experts(hidden, index, weights, experts.gate_up_proj.dequantize(), experts.down_proj.dequantize(),
                         backend="grouped_mm", lora_gate_up=factors["gate_up_proj"], lora_down=factors["down_proj"])
    want = torch.autograd.grad(ref.square().sum(), [hidden, *lora_params])
    assert max_diff(out, ref) < 1e-4
    for g, w in zip(got, want, strict=True):
        assert max_diff(g, w) < 1e-4 * max(1.0, w.abs().max().item())


def test_auto_times_the_backends_at_the_datasets_typical_micro_batch():
    """R-like rows (a few hundred tokens) are timed at a packed or padded batch of them, not at batch x max length."""
    import random

    from fmsaccel_moe.backend import typical_batch_tokens

    rng = random.Random(1)
    lengths = [min(2048, max(32, round(rng.lognormvariate(5.4, 0.6)))) for _ in range(500)]
    packed, how = typical_batch_tokens(lengths, 4, 4 * 2048, packed=True, multipack=False)
    padded, _ = typical_batch_tokens(lengths, 4, 4 * 2048, packed=False, multipack=False)
    assert how == "the median packed micro-batch" and 700 < packed < 1600  # about 4 x 269
    assert packed < padded <= 4 * 2048 and padded % 4 == 0  # padded: 4 x the longest of the four
    assert typical_batch_tokens(lengths, 4, 8192, packed=True, multipack=True) == (8192, "multipack's token budget")
    assert typical_batch_tokens(None, 4, 8192, packed=False, multipack=False) == (8192, "batch x max_seq_length")
    # the same answer every time (every rank times the same count)
    assert typical_batch_tokens(lengths, 4, 8192, packed=True, multipack=False)[0] == packed
    # never above the budget, even if the lengths say otherwise
    assert typical_batch_tokens([5000] * 8, 4, 8192, packed=True, multipack=False)[0] == 8192


class _Trainer:
    def __init__(self, model):
        self.model = model


def test_compile_layers_compiles_around_the_experts_and_matches_eager(monkeypatch):
    """Each decoder layer becomes one compiled graph with the experts as custom ops in it; loss, load-balancing loss
    and every gradient match the eager patched model under gradient checkpointing, for three row lengths, without a
    recompile per length or per layer. On the CPU Inductor compiles C++ kernels; the plugin itself skips the CPU
    (tested below)."""
    import torch._dynamo

    import fmsaccel_framework.compiling
    from fmsaccel_cli import moe_compat

    monkeypatch.setattr(fmsaccel_framework.compiling, "skip_reason", lambda model, fsdp: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model("granitemoe", seed=5)
    # router logits recorded (TRL turns the load-balancing loss on): transformers' recording hooks inside compiled
    # layers once broke the graph (a ContextVar) or recompiled per layer (a global list's length)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.1
    moe_compat.record_router_logits(model)  # what `fmsaccel run` does (transformers 5.17's Granite records none)
    eager = _plugin(backend="triton").augment(model, _ctx())
    compiled = copy.deepcopy(eager)
    ctx = _ctx()
    plugin = _plugin(backend="triton", compile_layers=True)
    plugin.prepare_trainer(_Trainer(compiled), ctx)
    assert ctx.report.entries == {("accelerated-moe", "GraniteMoeDecoderLayer -> torch.compile (dynamic shapes, one "
                                   "graph for all layers, experts as custom ops in it; compiles on the first step)"): 2}
    for m in (eager, compiled):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    for seed, length in ((1, 12), (2, 7), (3, 19)):
        batch = _batch(seed, shape=(2, length))
        want, got = eager(**batch), compiled(**batch)
        assert got.aux_loss > 0
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
        want.loss.backward()
        got.loss.backward()
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            assert max_diff(p.grad, q.grad) < 1e-5, name
            p.grad = q.grad = None
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])  # the experts are in the graph
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all layers and lengths


def test_compile_layers_is_skipped_on_the_cpu_and_left_to_foak_when_it_compiled():
    from fmsaccel_framework.compiling import compile_decoder_layers

    ctx = _ctx()
    plugin = _plugin(compile_layers=True)
    model = plugin.augment(tiny_model("granitemoe"), ctx)
    if DEVICE.type == "cpu":
        plugin.prepare_trainer(_Trainer(model), ctx)
        assert any("compile_layers skipped: the model is on cpu" in m for _, m in ctx.report.notes)
    model = plugin.augment(tiny_model("granitemoe"), ctx)
    compile_decoder_layers(model)  # what foak's compile_layers (order 20) does first
    ctx = _ctx()
    plugin.prepare_trainer(_Trainer(model), ctx)
    assert not ctx.report.entries and any("compiled (foak's compile_layers)" in m for _, m in ctx.report.notes)


@pytest.mark.parametrize("compiler", ["foak", "moe"])
def test_foak_compiled_moe_layers_with_padding_free_rows_match_eager(monkeypatch, compiler):
    """The `-padding-free-foak` combination compiled by foak (with its RMSNorm and RoPE, their torch references here)
    or by the MoE plugin with the recipe's own foak keys (the fused loss, and the activation budget leaving some
    layers unchecked): padding-free rows, the experts as custom ops and the router logits: one graph (two with the
    budget), no breaks, and the loss, load-balancing loss and every gradient of the eager model, for rows of three
    shapes."""
    import torch._dynamo

    import fmsaccel_foak.runtime
    import fmsaccel_framework.compiling
    from fmsaccel_aadp.attention import register_attention
    from fmsaccel_aadp.collator import collate_padding_free
    from fmsaccel_cli import moe_compat
    from fmsaccel_foak.spec import FOAK

    monkeypatch.setattr(fmsaccel_foak.runtime, "is_interpreted", lambda kernel: False)
    monkeypatch.setattr(fmsaccel_framework.compiling, "skip_reason", lambda model, fsdp: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    foak_path = "training.fused_ops_and_kernels"

    def build(compiled: bool):
        model = tiny_model("granitemoe", seed=5)
        model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.1
        moe_compat.record_router_logits(model)
        ctx = _ctx(gradient_checkpointing=True)
        foak_keys = {k: v.default for k, v in FOAK.paths[foak_path].items()}
        if compiler == "foak":
            foak_keys.update(base_layer=None, fast_loss=True, fast_rms_layernorm=True, fast_rope_embeddings=True,
                             compile_layers=compiled)
        else:
            foak_keys.update(RECIPE.plugins.training.fused_ops_and_kernels)
            foak_keys["activation_budget_gib"] = 40 * 3000 / 2**30  # at these lengths: one or both of the two layers
        # with foak's key, the MoE plugin still finds the layers compiled and supplies the router logits
        foak = FOAK.build({foak_path: foak_keys})
        moe = _plugin(backend="grouped_mm", compile_layers=compiled and compiler == "moe")
        model = moe.augment(foak.augment(model, ctx), ctx)
        model.set_attn_implementation(register_attention("sdpa_masked"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = _Trainer(model)
        foak.prepare_trainer(trainer, ctx)
        moe.prepare_trainer(trainer, ctx)
        return model, ctx

    eager, _ = build(False)
    compiled, ctx = build(True)
    if compiler == "foak":
        assert any("compiled (foak's compile_layers)" in m for _, m in ctx.report.notes)
    else:
        assert any("torch.compile" in what for _, what in ctx.report.entries)
        assert any("activation" in what for _, what in ctx.report.entries)
        layers = compiled.model.layers
        released = []
        compiled.model.register_forward_hook(lambda *_: released.append([not m.gradient_checkpointing for m in layers]))
    g = torch.Generator().manual_seed(0)
    for lengths in [(20, 7, 13), (9, 30), (40, 3, 8, 2)]:
        rows = [{"input_ids": torch.randint(1, 128, (n,), generator=g).tolist()} for n in lengths]
        batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in collate_padding_free(rows).items()}
        want, got = (m(**batch, use_cache=False) for m in (eager, compiled))
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        want.loss.backward()
        got.loss.backward()
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            assert max_diff(p.grad, q.grad) < 1e-5, name
            p.grad = q.grad = None
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph for all layers and lengths; with the budget, one more for the layers it leaves unchecked (outside a
    # checkpoint, where saved-tensor hooks differ)
    assert counters["stats"]["unique_graphs"] == (1 if compiler == "foak" else 2)
    if compiler == "moe":  # the budget left both layers unchecked on short batches, only the last on the longest
        assert {tuple(r) for r in released} == {(True, True), (False, True)}, released
