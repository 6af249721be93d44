"""compile_layers: the compiled decoder layers compute what the eager patched model computes, in one graph."""

from __future__ import annotations

import pytest
import torch
from foak_testing import DEVICE, VOCAB, build_plugin, padding_free_lora_model, tiny_model, train_step
from peft import LoraConfig, get_peft_model

from fmsaccel_aadp.collator import collate_padding_free
from fmsaccel_framework.plugin import PluginError, TrainContext

PATH = "peft.quantization.fused_ops_and_kernels"


class _Trainer:
    def __init__(self, model):
        self.model = model


def _model(compiled: bool | str, base_layer: str | None, **keys):
    """Tiny Llama, LoRA (dropout 0.1) on q/k/v/o, all foak kernels, padding-free attention, checkpointing."""
    return padding_free_lora_model(base_layer, compile_layers=compiled, **keys)


def _rows():
    """Padding-free rows of different lengths and example counts (each must reuse the one graph)."""
    g = torch.Generator().manual_seed(0)
    for lengths in [(20, 7, 13), (9, 30), (40, 3, 8, 2)]:
        batch = collate_padding_free([{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()}
                                      for n in lengths])
        yield {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fresh_dynamo_on_the_cpu(monkeypatch, codegen: bool = False) -> None:
    """Reset Dynamo's caches and counters; on the CPU, compile with the ops' torch references.

    A CPU run stays eager (``skip_reason``) and Dynamo cannot trace Triton's interpreter, so here the
    compile plumbing is what is tested; Triton kernels inside compiled layers run in the GPU benchmarks.
    Without ``codegen`` the graphs are traced and partitioned as Inductor's are, but not compiled to C++
    (minutes of the suite); one test keeps Inductor's code generation.
    """
    import torch._dynamo

    import fmsaccel_foak.runtime
    import fmsaccel_framework.compiling

    if DEVICE == "cpu":
        monkeypatch.setattr(fmsaccel_foak.runtime, "is_interpreted", lambda kernel: False)
        monkeypatch.setattr(fmsaccel_framework.compiling, "skip_reason", lambda model, fsdp: None)
        if not codegen:
            monkeypatch.setattr(fmsaccel_framework.compiling, "COMPILE_BACKEND", "aot_eager_decomp_partition")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _assert_matches_eager(eager, compiled) -> None:
    """Loss and every LoRA gradient, for rows of three lengths."""
    for batch in _rows():
        want_loss, want = train_step(eager, batch)
        got_loss, got = train_step(compiled, batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
        assert got.keys() == want.keys() and len(got) == 16
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("base_layer", [None, "bitsandbytes"])
def test_compiled_layers_match_eager_in_one_graph(base_layer, monkeypatch):
    """The compile plumbing (patched forwards, padding-free attention, checkpointing, bnb); Inductor's C++ once."""
    _fresh_dynamo_on_the_cpu(monkeypatch, codegen=base_layer is None)
    eager, _ = _model(False, base_layer)
    compiled, ctx = _model(True, base_layer)
    assert any("torch.compile" in what and count == 2 for (_, what), count in ctx.report.entries.items())
    _assert_matches_eager(eager, compiled)
    stats = torch._dynamo.utils.counters["stats"]
    # both layers and all three row shapes went through one compiled graph, without graph breaks
    assert stats["unique_graphs"] == 1 and stats["calls_captured"] >= 2
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_unchecked_bnb_layers_keep_no_dequantised_weights(monkeypatch):
    """bitsandbytes layers the activation budget runs unchecked dequantise again in the compiled backward.

    With CSE the forward's and the backward's dequantisation would merge, and the partitioner would save the
    result, so foak compiles bitsandbytes models without it. (The GPTQ base layer dequantises through a Triton
    kernel on the GPU, which CSE does not merge; on the CPU it is plain torch, so it is not checked here.)
    """
    _fresh_dynamo_on_the_cpu(monkeypatch)
    with torch._functorch.config.patch(cse=True):  # the plugin turns it off; restored on the way out
        _check_no_dequantised_weights_saved()


def _check_no_dequantised_weights_saved():
    model, ctx = _model(True, "bitsandbytes", activation_budget_gib=1.0)  # every layer fits at these lengths
    assert "CSE off" in "\n".join(ctx.report.lines())
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if type(m).__name__ == "Linear"} | {
        (m.out_features, m.in_features) for m in model.modules() if hasattr(m, "out_features")}
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    batch = next(_rows())
    assert batch["input_ids"].shape[1] not in {d for shape in weight_shapes for d in shape}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    assert saved and not weight_shapes & set(saved), weight_shapes & set(saved)


def test_whole_decoder_stack_compiles_as_one_region(monkeypatch):
    """compile_layers: model: the decoder stack is one compiled region, matching eager across row shapes.

    The one graph break is at the embeddings: transformers' input-require-grads hook (for checkpointing
    a frozen model) calls ``requires_grad_`` there, so the embeddings are one graph and the layers another.
    """
    _fresh_dynamo_on_the_cpu(monkeypatch)
    eager, _ = _model(False, None)
    compiled, ctx = _model("model", None)
    assert [what for (_, what) in ctx.report.entries if "one region" in what] == [
        "LlamaModel (2 LlamaDecoderLayer) -> torch.compile as one region (dynamic shapes; compiles on the first step)"]
    _assert_matches_eager(eager, compiled)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] <= 2 and stats["calls_captured"] >= 2  # no recompiles across row lengths
    assert all("requires_grad_" in reason for reason in torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("fsdp", [True, False])
def test_compile_layers_skipped_loudly_under_fsdp_and_on_cpu(fsdp, caplog):
    """The padding-free foak recipes ask for compiled layers; FSDP and CPU runs of them train eagerly, and say so."""
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    ctx = TrainContext(args={"distributed": {"strategy": "fsdp"}} if fsdp else {})
    build_plugin(PATH, compile_layers=True).prepare_trainer(_Trainer(model), ctx)
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(layer._compiled_call_impl is None for layer in layers)
    why = "FSDP" if fsdp else "not a CUDA GPU"
    assert any(why in what for (_, what) in ctx.report.notes) and why in caplog.text


def test_compile_layers_and_selective_checkpointing_refused_together():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(PluginError, match="cannot be combined"):
        build_plugin(PATH, compile_layers=True, selective_checkpointing=True).prepare_trainer(
            _Trainer(model), TrainContext(args={"gradient_checkpointing": True}))


@pytest.mark.parametrize("scope", [False, "model"])
def test_checkpoint_in_graph_needs_per_layer_compilation(scope):
    with pytest.raises(PluginError, match="checkpoint_in_graph .* needs compile_layers: true"):
        build_plugin(PATH, compile_layers=scope, checkpoint_in_graph=True)


def test_cuda_graphs_need_compiled_layers():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(PluginError, match="needs compile_layers"):
        build_plugin(PATH, cuda_graphs=True).prepare_trainer(_Trainer(model), TrainContext(args={}))


@pytest.mark.parametrize("scope,buckets", [("model", True), ("model", False), (True, True)])
def test_cuda_graphs_compile_the_decoder_for_replay_and_mark_each_step(scope, buckets, monkeypatch, caplog):
    """The decoder is compiled in reduce-overhead mode, a step is marked before each forward, rows unbucketed warn."""
    import fmsaccel_framework.compiling

    monkeypatch.setattr(fmsaccel_framework.compiling, "skip_reason", lambda model, fsdp: None)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    ctx = TrainContext(args={})
    ctx.extras["padding_free_buckets"] = buckets
    build_plugin(PATH, compile_layers=scope, cuda_graphs=True).prepare_trainer(_Trainer(model), ctx)
    regions = ["LlamaModel"] if scope == "model" else ["LlamaDecoderLayer"] * 2
    assert compiled == [(name, {"dynamic": True, "mode": "reduce-overhead", "backend": "inductor"}) for name in regions]
    assert any("replayed as CUDA graphs" in what for (_, what) in ctx.report.entries)
    assert ("not bucketed" in caplog.text) is not buckets
    assert "cuda_graphs is experimental" in caplog.text  # said loudly until a GPU run has gone through with it
    model(input_ids=torch.tensor([[1, 2, 3]], device=next(model.parameters()).device))
    assert marks == [True]


@pytest.mark.parametrize("keys", [{"cuda_graphs": True}, {"checkpoint_in_graph": True}])
def test_checkpoint_inside_each_compiled_layer(keys, monkeypatch):
    """With cuda_graphs (or checkpoint_in_graph) each layer checkpoints inside its compiled region.

    transformers' call site passes through. On the CPU Inductor skips the graphs themselves; what is tested
    is that the checkpoint moved (transformers' function now sits in the layer's own forward), that the
    layers still compile to one graph without breaks, and that loss and gradients match the eager model.
    """
    from fmsaccel_framework.compiling import _run_directly

    _fresh_dynamo_on_the_cpu(monkeypatch)
    eager, _ = _model(False, None)
    compiled, ctx = _model(True, None, **keys)
    assert any("checkpointed inside the graph" in what for (_, what) in ctx.report.entries)
    if "checkpoint_in_graph" in keys:  # what the GPU measured (s10c1) is said with it
        assert "measured without memory savings" in "\n".join(ctx.report.lines())
    _assert_matches_eager(eager, compiled)
    layers = [m for m in compiled.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert all(layer._gradient_checkpointing_func is _run_directly for layer in layers)
    assert all(layer._foak_checkpoint_func.func is torch.utils.checkpoint.checkpoint for layer in layers)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1 and not torch._dynamo.utils.counters["graph_break"]


def test_checkpoint_inside_calls_the_installed_function_once_per_layer_and_forward():
    """Eager, with a spy for transformers' checkpoint function: installed later, still moved and used."""
    from fmsaccel_framework.compiling import _run_directly, checkpoint_inside

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    checkpoint_inside(model, layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    calls = []

    def spy(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    for layer in layers:
        layer._gradient_checkpointing_func = spy  # as gradient_checkpointing_enable would, after the patch
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == len(layers)  # once each: transformers' own call site ran the layer directly
    assert all(layer._gradient_checkpointing_func is _run_directly for layer in layers)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == len(layers)  # no checkpoint without gradients


def test_cuda_graphs_skipped_loudly_with_the_compiled_layers(caplog):
    """On the CPU the layers stay eager; the report names cuda_graphs too, not only compile_layers."""
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    ctx = TrainContext(args={})
    build_plugin(PATH, compile_layers=True, cuda_graphs=True).prepare_trainer(_Trainer(model), ctx)
    assert any(what.startswith("compile_layers and cuda_graphs skipped") for (_, what) in ctx.report.notes)
    assert "compile_layers and cuda_graphs: the decoder layers stay eager" in caplog.text
