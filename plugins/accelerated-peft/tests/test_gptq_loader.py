"""Loading GPTQ checkpoints: both zero-point formats, both config files, biases, tied embeddings, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from fmsaccel_framework.plugin import PluginError
from fmsaccel_peft.gptq import QuantLinear, load_quantized, packing, read_quant_config
from fmsaccel_peft.gptq.quantize import quantize_model

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied embeddings) in full precision and as an RTN v1 GPTQ checkpoint."""
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.1)
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "fp")
    quantize_model(str(root / "fp"), root / "v1", method="rtn", group_size=32, progress=lambda m: None)
    with torch.no_grad():
        logits = load_quantized(root / "v1", dtype=torch.float32, device="cpu")(IDS).logits
    return root, model, logits


def _copy(root, tmp_path, name="copy"):
    return shutil.copytree(root / "v1", tmp_path / name)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_v1_checkpoint_loads_with_bias_and_tied_embeddings(checkpoints):
    root, reference, logits = checkpoints
    model = load_quantized(root / "v1", dtype=torch.float32, device="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bias is not None
    torch.testing.assert_close(q_proj.bias, reference.model.layers[0].self_attn.q_proj.bias)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.gptq_config.checkpoint_format == "gptq" and model.gptq_config.group_size == 32
    with torch.no_grad():
        expected = reference(IDS).logits
    assert ((logits - expected).norm() / expected.norm()).item() < 0.15
    assert model.model.embed_tokens.weight.dtype == torch.float32
    bf16 = load_quantized(root / "v1", dtype=torch.bfloat16, device="cpu")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and q_proj.scales.dtype == torch.float16


def test_v2_zero_points_load_to_the_same_model(checkpoints, tmp_path):
    """v2 stores the zero points themselves: re-encode v1 as v2 and the model must not change."""
    root, _, logits = checkpoints
    path = _copy(root, tmp_path)

    def to_v2(tensors):
        for name in [n for n in tensors if n.endswith(".qzeros")]:
            tensors[name] = packing.pack_cols(packing.unpack_cols(tensors[name]) + 1)

    _edit_tensors(path, to_v2)
    _edit_config(path, checkpoint_format="gptq_v2")
    assert read_quant_config(path).zero_offset == 0
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(path, dtype=torch.float32, device="cpu")(IDS).logits, logits)


def test_settings_from_quantize_config_json(checkpoints, tmp_path):
    """AutoGPTQ/GPTQModel keep the settings in quantize_config.json (GPTQModel names the format `format`)."""
    root, _, logits = checkpoints
    path = _copy(root, tmp_path)
    config = json.loads((path / "config.json").read_text())
    settings = config.pop("quantization_config")
    settings["format"] = settings.pop("checkpoint_format")
    (path / "config.json").write_text(json.dumps(config))
    (path / "quantize_config.json").write_text(json.dumps(settings))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(path, dtype=torch.float32, device="cpu")(IDS).logits, logits)


def _drop(name):
    return lambda tensors: tensors.pop(name)


BROKEN = {
    "8-bit": (dict(bits=8), None, "8-bit GPTQ is not supported"),
    "marlin": (dict(checkpoint_format="marlin"), None, "format 'marlin' is not supported"),
    "marlin-flag": (dict(is_marlin_format=True), None, "format 'marlin' is not supported"),
    "awq": (dict(quant_method="awq"), None, "quantised with 'awq', not GPTQ"),
    "no-qzeros": ({}, _drop("model.layers.0.mlp.up_proj.qzeros"), "missing tensors: model.layers.0.mlp.up_proj.qzeros"),
    "no-bias": ({}, _drop("model.layers.1.self_attn.k_proj.bias"),
                "missing tensors: model.layers.1.self_attn.k_proj.bias"),
    "no-g_idx-act-order": (dict(desc_act=True), _drop("model.layers.0.self_attn.o_proj.g_idx"),
                           "missing tensors: model.layers.0.self_attn.o_proj.g_idx"),
    "no-norm": ({}, _drop("model.norm.weight"), "missing tensors: model.norm.weight"),
    "bad-scales": ({}, lambda t: t.update({"model.layers.0.mlp.down_proj.scales": torch.zeros(3, 64).half()}),
                   "down_proj' do not fit together: scales has shape"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_unloadable_checkpoints_say_what_is_wrong(case, checkpoints, tmp_path):
    root, _, _ = checkpoints
    settings, edit, message = BROKEN[case]
    path = _copy(root, tmp_path)
    _edit_config(path, **settings)
    if edit:
        _edit_tensors(path, edit)
    with pytest.raises(PluginError, match=message):
        load_quantized(path, device="cpu")


def test_not_gptq_no_safetensors_and_shape_mismatch(checkpoints, tmp_path):
    root, _, _ = checkpoints
    with pytest.raises(PluginError, match="not a GPTQ checkpoint"):
        load_quantized(root / "fp", device="cpu")

    path = _copy(root, tmp_path, "bin")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(PluginError, match=r"no \*.safetensors weights \(found pytorch_model.bin"):
        load_quantized(path, device="cpu")

    path = _copy(root, tmp_path, "shape")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(PluginError, match="down_proj. is 192->64 in the model config but 128->64 in the checkpoint"):
        load_quantized(path, device="cpu")
