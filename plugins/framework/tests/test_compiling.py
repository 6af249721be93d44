"""Regional compilation helpers: transformers' output collector inside compiled regions."""

from __future__ import annotations

import logging

import pytest
import torch

import fmsaccel_framework.compiling


def test_output_collector_is_off_inside_compiled_regions_and_says_what_it_cannot_record(caplog, monkeypatch):
    """Hooks reading the collector trace without a graph break (fullgraph) and see none there; outside they see it.
    Asking for outputs no plugin supplies from compiled layers warns once: hidden states, or router logits (the
    load-balancing loss) unless a plugin declared it supplies them."""
    from transformers.utils import output_capturing

    from fmsaccel_framework import compiling
    from fmsaccel_framework.compiling import _CollectorOutsideGraphs, supply_output, traceable_output_capture

    monkeypatch.setattr(compiling, "SUPPLIED_OUTPUTS", set())  # none yet, whatever other tests declared

    assert traceable_output_capture() and traceable_output_capture()  # idempotent
    collector = output_capturing._active_collector
    assert isinstance(collector, _CollectorOutsideGraphs)
    collector.warned = False  # (another test in this process may have made it warn already)

    def hook_like(x):
        seen = output_capturing._active_collector.get()
        return x + 1 if seen is None else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(hook_like, fullgraph=True, backend="eager")
    token = collector.set({"router_logits": []})
    try:
        assert collector.get() == {"router_logits": []}
        assert compiled(torch.zeros(2)).tolist() == [1.0, 1.0]  # inside: no collector
    finally:
        collector.reset(token)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    assert [m for m in warnings() if "record no router_logits" in m] == warnings() and len(warnings()) == 1
    caplog.clear()
    supply_output("router_logits")  # what accelerated-moe declares when it hands them over
    collector.warned = False
    collector.reset(collector.set({"router_logits": []}))
    assert not warnings()
    for _ in range(2):
        collector.reset(collector.set({"hidden_states": [], "router_logits": []}))
    assert [m for m in warnings() if "record no hidden_states" in m] == warnings() and len(warnings()) == 1


def test_compiled_layers_that_break_or_fall_back_say_so_after_the_first_forward(caplog, monkeypatch):
    """A graph break inside a compiled layer is reported once, loudly, after the first training forward; a clean
    compile says nothing."""
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmsaccel_framework.compiling import compile_decoder_layers

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=32)).train()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    monkeypatch.setattr(fmsaccel_framework.compiling, "COMPILE_BACKEND", "eager")
    ids = torch.randint(0, 32, (1, 6))
    for broken in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        caplog.clear()
        m = model()
        if broken:
            for layer in m.model.layers:
                layer.mlp.register_forward_hook(lambda *_: torch._dynamo.graph_break())
        compile_decoder_layers(m)
        for _ in range(2):
            m(input_ids=ids).logits.sum().backward()
        said = [w for w in warnings() if "not one compiled graph" in w]
        assert len(said) == int(broken), warnings()
        if broken:
            assert "graph break" in said[0]


def test_layers_compiled_under_ddp_are_not_split_at_gradient_buckets(monkeypatch):
    """Under DDP, Dynamo's DDPOptimizer would split each compiled layer at gradient-bucket boundaries (it assumes it
    sees the whole model) and crashed doing so on 2 GPUs (s12c3). Regional compilation turns it off; a DDP step over
    compiled layers, with buckets small enough to split them, never reaches it and trains like the plain model."""
    import os

    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.backends import distributed as dynamo_ddp
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmsaccel_framework.compiling import compile_decoder_layers

    splits = []
    monkeypatch.setattr(dynamo_ddp.DDPOptimizer, "compile_fn", lambda self, *a: splits.append(a) or None)
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 64)
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", "29547")
    monkeypatch.setattr(fmsaccel_framework.compiling, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)  # the default, restored after the test

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=32)).train()

    torch._dynamo.reset()
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        plain, compiled = model(), model()
        compile_decoder_layers(compiled)
        assert torch._dynamo.config.optimize_ddp is False
        ddp = torch.nn.parallel.DistributedDataParallel(compiled, bucket_cap_mb=64 / 2**20)
        ids = torch.randint(0, 32, (2, 6))
        want, got = plain(input_ids=ids, labels=ids).loss, ddp(input_ids=ids, labels=ids).loss
        want.backward()
        got.backward()
    finally:
        dist.destroy_process_group()
    assert not splits
    torch.testing.assert_close(got, want)
    for p, q in zip(compiled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_regional_compilation_turns_off_inductor_fusions_that_guard_on_the_token_count(monkeypatch):
    """Mix-order reductions fuse only above a size: under dynamic shapes that is a guard on the token count, and every
    compiled layer recompiles the first time a batch crosses it (s13c3: 13 s mid-run, full fine-tuning). Regional
    compilation turns them off, so Inductor's scheduler never asks (it is GPU-only: not reproducible on the CPU)."""
    import torch._inductor.config as inductor
    from torch._inductor import scheduler
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmsaccel_framework.compiling import compile_decoder_layers

    if not hasattr(inductor.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reductions")
    monkeypatch.setattr(fmsaccel_framework.compiling, "COMPILE_BACKEND", "eager")
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    # inductor's own patch, not monkeypatch: monkeypatch's undo deletes the key, which hides it from Inductor for
    # the rest of the process ("does not exist" in every later compile)
    with inductor.patch({"triton.mix_order_reduction": True}):
        assert compile_decoder_layers(model)
        assert inductor.triton.mix_order_reduction is False
        assert scheduler.MixOrderReduction.can_fuse(None, None) is False  # returns before looking at the nodes
