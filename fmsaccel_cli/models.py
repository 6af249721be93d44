"""Built-in model shapes: random-initialised models of real architectures.

Nothing can be downloaded on CI or on the benchmark GPU, so ``--model llama3-8b``
builds a model of that exact shape with random weights. ``materialize`` writes it
once as a normal checkpoint folder (config, safetensors, the shipped tokenizer)
so every loader — plain ``from_pretrained``, bitsandbytes, GPTQ quantisation —
takes the same path a user's real checkpoint would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"

_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False,
             # a wider init than real models use: with a frozen random lm_head at std 0.02 the logits
             # cannot move far enough for LoRA to bring the loss down visibly
             initializer_range=0.1)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SHAPES: dict[str, dict[str, Any]] = {
    # tiny shapes: CPU tests and the embedded default
    "tiny-llama": dict(model_type="llama", **_TINY),
    "tiny-mistral": dict(model_type="mistral", **_TINY),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY),
    "tiny-granite": dict(model_type="granite", **_TINY),
    "tiny-mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_TINY),
    "tiny-granitemoe": dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2,
                            **{**_TINY, "intermediate_size": 128}),
    # real shapes (random weights) for benchmarks
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       max_position_embeddings=32768, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6),
    "granite-8b": dict(model_type="granite", hidden_size=4096, intermediate_size=12800, num_hidden_layers=40,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=49155,
                       max_position_embeddings=4096, embedding_multiplier=12.0, logits_scaling=16.0,
                       residual_multiplier=0.22, attention_multiplier=0.0078125, tie_word_embeddings=True),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768),
    "granite-3.0-3b-a800m": dict(model_type="granitemoe", hidden_size=1536, intermediate_size=512,
                                 num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                                 vocab_size=49155, num_local_experts=40, num_experts_per_tok=8,
                                 max_position_embeddings=4096, embedding_multiplier=12.0, logits_scaling=6.0,
                                 residual_multiplier=0.22, attention_multiplier=0.015625),
}


def is_shape(name: str) -> bool:
    return name in SHAPES


def cache_root() -> Path:
    return Path(os.environ.get("FMSACCEL_CACHE", Path.home() / ".cache" / "fmsaccel"))


def build_config(name: str, overrides: dict[str, Any] | None = None):
    """The transformers config of a built-in shape, with optional overrides (e.g. fewer layers)."""
    from transformers import AutoConfig

    kwargs = {**SHAPES[name], **(overrides or {})}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def materialize(name: str, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a random-initialised checkpoint of a built-in shape once and return its folder.

    Safe under several processes: one builds while the others wait on a file lock.
    """
    import fcntl

    recipe = {"shape": SHAPES[name], "overrides": overrides or {}, "seed": seed}
    tag = f"{name}-{hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]}"
    target = cache_root() / "models" / tag
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _write_random_checkpoint(name, overrides, seed, target)
    return target


def _write_random_checkpoint(name: str, overrides: dict[str, Any] | None, seed: int, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(name, overrides)
    device = "cuda" if _fits_on_gpu(config) else "cpu"
    print(f"[fmsaccel] building a random-initialised {name} ({config.model_type}) on {device} -> {target}", flush=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / ".complete").write_text(name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _fits_on_gpu(config) -> bool:
    """Whether the bf16 model fits in the GPU's free memory with room to spare (a 70B shape is built on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        return False
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return params * 2 < 0.8 * torch.cuda.mem_get_info()[0]


def check_model(name_or_path: Any) -> None:
    """A FileNotFoundError (one clear line) unless this is a built-in shape or a folder with a config.json."""
    import difflib

    if isinstance(name_or_path, str) and (is_shape(name_or_path) or
                                          (Path(name_or_path).expanduser() / "config.json").exists()):
        return
    close = difflib.get_close_matches(str(name_or_path), list(SHAPES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise FileNotFoundError(f"model '{name_or_path}' not found: not a folder with a config.json, nor a built-in "
                            f"shape{hint} ({', '.join(SHAPES)})")


def resolve_model_path(name_or_path: str, overrides: dict[str, Any] | None = None) -> Path:
    """A checkpoint folder for a shape name or a local path (clear error when neither)."""
    check_model(name_or_path)
    if is_shape(name_or_path):
        return materialize(name_or_path, overrides)
    return Path(name_or_path).expanduser()
