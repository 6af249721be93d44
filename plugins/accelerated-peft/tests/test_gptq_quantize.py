"""GPTQ and RTN quantisation: the algorithm on one layer, and whole tiny models written in the standard layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from fmsaccel_peft.gptq import QuantLinear, load_quantized, packing, quantize
from fmsaccel_peft.gptq.quantize import gptq_quantize, quantize_model, rtn_quantize


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Calibration-like activations: correlated features with a decaying spectrum and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features).unsqueeze(1)
    x = torch.randn(n, features, generator=g) @ mixing
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("group_size,act_order,sym", [(32, False, True), (32, True, True), (-1, False, False),
                                                      (64, True, False)])
def test_gptq_reconstructs_better_than_rtn(group_size, act_order, sym):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=g) * 0.05
    x = _correlated_inputs(512, 128)
    hessian = 2 * x.t() @ x / x.shape[0]

    gptq = gptq_quantize(weight, hessian, group_size, sym=sym, act_order=act_order)
    rtn = rtn_quantize(weight, group_size, sym=sym)

    error = lambda q: (x @ (weight - q.dequantize()).t()).norm().item()
    assert error(gptq) < 0.8 * error(rtn)
    groups = packing.num_groups(128, group_size)
    assert gptq.intweight.shape == (48, 128) and gptq.scales.shape == gptq.zeros.shape == (groups, 48)
    assert 0 <= gptq.intweight.min() and gptq.intweight.max() <= 15
    assert 1 <= gptq.zeros.min() and gptq.zeros.max() <= 15  # v1-storable
    sequential = packing.sequential_g_idx(128, group_size)
    assert torch.equal(torch.bincount(gptq.g_idx.long()), torch.bincount(sequential.long()))  # full groups
    assert act_order != torch.equal(gptq.g_idx, sequential)
    # packing and the kernels' plain-torch dequantise reproduce the quantised weight exactly
    t = packing.pack(*gptq)
    back = packing.dequantize_torch(t["qweight"], t["scales"], t["qzeros"], t["g_idx"], zero_offset=1)
    torch.testing.assert_close(back, gptq.dequantize(), rtol=0, atol=0)


def test_rtn_is_round_to_nearest_within_a_group():
    weight = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5]])
    q = rtn_quantize(weight, group_size=-1, sym=False)
    scale = float(q.scales[0, 0])
    assert scale == pytest.approx(2.5 / 15, rel=1e-3) and int(q.zeros[0, 0]) == 6
    assert (q.dequantize() - weight).abs().max() <= scale / 2 + 1e-6


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("fp") / "tiny"
    model.save_pretrained(path)
    return path, model.eval()


@pytest.mark.parametrize("method,act_order", [("rtn", False), ("gptq", True)])
def test_quantized_tiny_model_is_close_to_full_precision(method, act_order, tiny_checkpoint, tmp_path):
    source, reference = tiny_checkpoint
    lines = []
    out = quantize_model(str(source), tmp_path / "q", method=method, group_size=32, act_order=act_order,
                         calib_samples=8, seq_len=64, progress=lines.append)
    assert sum(line.startswith("layer ") for line in lines) == 2
    assert (method == "gptq") == any("calibrating on random tokens" in line for line in lines)  # no tokenizer

    model = load_quantized(out, dtype=torch.float32, device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert any(m.act_order for m in model.modules() if isinstance(m, QuantLinear)) == act_order
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = reference(ids).logits, model(ids).logits
    assert ((actual - expected).norm() / expected.norm()).item() < 0.15


def test_output_is_the_standard_layout_and_shards(tiny_checkpoint, tmp_path, monkeypatch):
    source, reference = tiny_checkpoint
    monkeypatch.setattr(quantize, "SHARD_BYTES", 64 * 1024)
    out = quantize_model(str(source), tmp_path / "q", method="rtn", group_size=64, sym=False, progress=lambda m: None)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config | {"meta": None} == {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False, "damp_percent": 0.01,
        "true_sequential": False, "static_groups": False, "checkpoint_format": "gptq", "meta": None}
    assert json.loads((out / "quantize_config.json").read_text()) == json.loads((out / "config.json").read_text())[
        "quantization_config"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.weight" not in index and "model.layers.1.input_layernorm.weight" in index
    with safe_open(str(out / index[f"{name}.qweight"]), "pt") as f:
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qweight").shape == (128 // 8, 64)
    with safe_open(str(out / index[f"{name}.scales"]), "pt") as f:
        assert f.get_tensor(f"{name}.scales").shape == (2, 64) and f.get_tensor(f"{name}.scales").dtype == torch.float16

    model = load_quantized(out, dtype=torch.float32, device="cpu")
    layer = model.get_submodule(name)
    expected = rtn_quantize(reference.get_submodule(name).weight, 64, sym=False).dequantize()
    torch.testing.assert_close(layer.dequantize(torch.float32), expected, rtol=0, atol=0)


def test_builtin_shape_calibrates_on_shipped_data(tmp_path):
    """A built-in shape name quantises layer by layer from random init; its tokenizer reads the shipped data."""
    from fmsaccel_cli import models

    lines = []
    out = quantize_model("tiny-llama", tmp_path / "q", method="gptq", group_size=32, calib_samples=4, seq_len=32,
                         progress=lines.append)
    assert any("calibrating on the shipped word_tasks.jsonl" in line for line in lines)
    assert (out / "tokenizer.json").exists()
    model = load_quantized(out, dtype=torch.bfloat16, device="cpu")
    assert model.config.hidden_size == models.SHAPES["tiny-llama"]["hidden_size"]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_calibration_files(suffix, tmp_path):
    from fmsaccel_cli import models

    rows = [{"text": f"sample {i}: the quick brown fox jumps over the lazy dog"} for i in range(10)]
    file = tmp_path / f"calib{suffix}"
    file.write_text({".jsonl": "\n".join(json.dumps(r) for r in rows), ".json": json.dumps(rows),
                     ".txt": " ".join(r["text"] for r in rows)}[suffix])
    source = quantize._Source(models.build_config("tiny-llama"), None, models.TOKENIZER_DIR, "tiny-llama")
    ids = quantize._calibration_ids(source, file, samples=3, seq_len=16, seed=0, progress=lambda m: None)
    assert ids.shape == (3, 16) and ids.max() < source.config.vocab_size


def test_quantize_refuses_bad_requests(tiny_checkpoint, tmp_path):
    source, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="only 4-bit"):
        quantize_model(str(source), tmp_path / "a", bits=3)
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        quantize_model(str(source), tmp_path / "a", method="awq")
    with pytest.raises(ValueError, match="act-order only applies to GPTQ"):
        quantize_model(str(source), tmp_path / "a", method="rtn", act_order=True)
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        quantize_model("no-such-model", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty"):
        quantize_model(str(source), tmp_path / "full")
    out = quantize_model(str(source), tmp_path / "q", method="rtn", progress=lambda m: None)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(str(out), tmp_path / "again")
