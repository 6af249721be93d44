"""Recipe resolution: merge order, provenance, and one clear error per bad input."""

from __future__ import annotations

import pytest
import yaml

from fmsaccel_cli import recipes as rc


def test_every_shipped_recipe_resolves_and_validates():
    for name in rc.recipe_names():
        resolved = rc.resolve(name)
        rc.validate(resolved, check_args=False)
    # the seed's shortnames are all there
    for name in ("baseline-peft-bnb", "accelerated-peft-bnb", "accelerated-peft-autogptq",
                 "accelerated-peft-autogptq-foak-padding-free", "moe-scattermoe-granite-ep8-foak",
                 "full-finetuning", "standard-peft"):
        assert name in rc.recipe_names()


def test_merge_order_and_provenance(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"arguments": {"r": 4, "learning_rate": 0.1},
                                   "plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "fp4"}}}}}))
    resolved = rc.resolve("accelerated-peft-bnb", cfg, ["r=2"], {"output_dir": "/tmp/x"})
    assert resolved.args["max_steps"] == 60 and resolved.sources["args.max_steps"] == "recipes/defaults.yaml"
    assert resolved.sources["args.lora_alpha"] == "recipes/scenarios.yaml#accelerated-peft-bnb"
    assert resolved.args["r"] == 2 and resolved.sources["args.r"] == "--set"  # --set beats --config
    assert resolved.args["learning_rate"] == 0.1 and resolved.sources["args.learning_rate"] == str(cfg)
    bnb = resolved.plugins["peft"]["quantization"]["bitsandbytes"]
    assert bnb == {"quant_type": "fp4", "no_peft_model": False}  # config beats the framework file, keeps the rest
    assert resolved.sources["plugins.peft.quantization.bitsandbytes.no_peft_model"].startswith("recipes/framework/")
    assert resolved.args["output_dir"] == "/tmp/x" and resolved.sources["args.output_dir"] == "--output_dir"


def test_null_drops_a_default_and_model_list_takes_first():
    resolved = rc.resolve("standard-peft", sets=["warmup_steps=null", "model_name_or_path=[tiny-llama, llama3-8b]"])
    assert "warmup_steps" not in resolved.args
    assert resolved.args["model_name_or_path"] == "tiny-llama"
    assert any("takes the first" in n for n in resolved.notes)


def test_full_finetuning_has_no_peft():
    resolved = rc.resolve("full-finetuning")
    assert "peft_method" not in resolved.args and resolved.plugins == {}


def test_set_numbers_and_nested_arguments():
    resolved = rc.resolve("standard-peft", sets=["learning_rate=5e-3", "distributed.strategy=fsdp"])
    assert resolved.args["learning_rate"] == 0.005
    assert resolved.args["distributed"] == {"strategy": "fsdp"}


@pytest.mark.parametrize(
    "sets, message",
    [
        (["plugins.peft.quantization.bitsandbytes.quant_typ=nf4"], "unknown key plugins.peft.quantization.bitsandbytes"
                                                                   ".quant_typ; did you mean 'quant_type'?"),
        (["plugins.peft.quantization.bitsandbytes.quant_type=nf8"], "is not one of: nf4, fp4"),
        (["plugins.peft.quantization.bitsandbytes.no_peft_model=3"], "wrong type (expected bool)"),
        (["plugins.training.attention.padding_fre.method=huggingface"], "no plugin claims plugins.training.attention"
                                                                        ".padding_fre; did you mean"),
        (["plugins.peft.quantization.auto_gptq.kernel=triton_v2"], "both load the model"),
    ],
)
def test_bad_plugin_config_is_one_clear_error(sets, message):
    with pytest.raises(rc.RecipeError) as e:
        rc.validate(rc.resolve("accelerated-peft-bnb", sets=sets), check_args=False)
    assert message in str(e.value)
    assert "--set" in str(e.value)  # names where the bad key came from


def test_seed_misspelling_is_rejected_with_file_and_suggestion(tmp_path):
    cfg = tmp_path / "foak.yaml"
    cfg.write_text("plugins:\n  training:\n    fused_ops_and_kernels:\n      fast_rsm_layernorm: true\n")
    with pytest.raises(rc.RecipeError) as e:
        rc.validate(rc.resolve("standard-peft", cfg), check_args=False)
    assert str(cfg) in str(e.value) and "did you mean 'fast_rms_layernorm'?" in str(e.value)


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(rc.RecipeError, match="did you mean 'accelerated-peft-bnb'"):
        rc.resolve("acelerated-peft-bnb")


def test_training_arguments_checked_against_sftconfig():
    with pytest.raises(rc.RecipeError, match="unknown argument 'learning_rat'; did you mean 'learning_rate'"):
        rc.validate(rc.resolve("standard-peft", sets=["learning_rat=0.1"]))
    with pytest.raises(rc.RecipeError, match="max_steps = 'many' has the wrong type"):
        rc.validate(rc.resolve("standard-peft", sets=["max_steps=many"]))
    rc.validate(rc.resolve("standard-peft", sets=["per_device_train_batch_size=2", "lora_dropout=0.05"]))


@pytest.mark.parametrize(
    "plugins, message",
    [
        ({"training": {"dataloader": {"multipack": {"num_processes": 2}}}}, "needs training.attention.padding_free"),
        ({"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"},
                                    "fused_ops_and_kernels": {"base_layer": "auto_gptq", "fused_lora": True}}}},
         "base_layer is auto_gptq but plugins.peft.quantization.auto_gptq is not configured"),
        ({"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}},
          "training": {"fused_ops_and_kernels": {"fused_lora": True}}},
         "fused_lora over a bitsandbytes model needs fused_ops_and_kernels.base_layer: bitsandbytes"),
    ],
)
def test_combinations_that_cannot_work(plugins, message):
    resolved = rc.Resolved("x", {}, plugins, {})
    with pytest.raises(rc.RecipeError, match=message):
        rc.validate(resolved, check_args=False)


def test_bare_framework_config_and_recipe_copy_validate(tmp_path):
    bare = tmp_path / "fw.yaml"
    bare.write_text("plugins:\n  peft:\n    quantization:\n      bitsandbytes:\n        quant_type: fp4\n")
    active = rc.validate(rc.load_recipe_file(bare), check_args=False)
    assert [s.name for s, _ in active] == ["accelerated-peft-bnb"]
    copy = tmp_path / "copy.yaml"
    copy.write_text(yaml.safe_dump(rc.resolve("accelerated-peft-bnb-foak").to_yaml_dict()))
    active = rc.validate(rc.load_recipe_file(copy))
    assert {s.name for s, _ in active} == {"accelerated-peft-bnb", "fused-ops-and-kernels",
                                        "attention-and-distributed-packing"}


def test_scenarios_files_validate():
    assert rc.validate_scenarios(rc.recipes_dir() / "scenarios.yaml") >= 6


def test_unknown_shortname_in_scenarios(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("scenarios:\n  - name: x\n    framework_config: [accelerated-peft-bnbb]\n    arguments: {r: 8}\n")
    with pytest.raises(rc.RecipeError, match="unknown framework_config 'accelerated-peft-bnbb'; did you mean"):
        rc.validate_scenarios(bad)


def test_seed_style_exponents_are_numbers(tmp_path):
    cfg = tmp_path / "seed.yaml"
    cfg.write_text("arguments:\n  learning_rate: 2e-5\n")
    resolved = rc.resolve("standard-peft", cfg, ["weight_decay=1e-2"])
    assert resolved.args["learning_rate"] == 2e-5 and resolved.args["weight_decay"] == 0.01
    rc.validate(resolved)
    assert rc.parse_set('x="1.0"') == ("x", "1.0")  # quoted stays text


@pytest.mark.slow
def test_a_built_wheel_carries_the_recipes(tmp_path):
    """recipes/ sits at the top of the repo; the package reaches it through a link that wheels copy."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(rc.__file__).resolve().parent.parent
    assert rc.REPO_RECIPES.resolve() == (repo / "recipes").resolve()
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("fmsaccel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(repo / "recipes").as_posix() for p in (repo / "recipes").rglob("*.yaml")}
    assert {f"fmsaccel_cli/recipes_data/{name}" for name in shipped} <= names


def test_omegaconf_interpolation_across_the_merged_recipe(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("arguments:\n  output_dir: /tmp/runs/r${r}-${plugins.peft.quantization.bitsandbytes.quant_type}\n")
    resolved = rc.resolve("accelerated-peft-bnb", cfg, sets=["r=8"])
    assert resolved.args["output_dir"] == "/tmp/runs/r8-nf4"
    cfg.write_text("arguments:\n  output_dir: /tmp/runs/${rank}\n")
    with pytest.raises(rc.RecipeError, match=r"r.yaml: output_dir: cannot resolve interpolation"):
        rc.resolve("accelerated-peft-bnb", cfg)


def test_argument_types_are_cached_per_version_and_a_bad_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FMSACCEL_CACHE", str(tmp_path))
    fresh = rc.training_argument_types()
    [cached] = (tmp_path / "argument-types").glob("*.json")
    assert cached.stem.count("-") >= 2  # trl-peft-transformers versions
    assert rc.training_argument_types() == fresh  # read back: the same names and types
    assert fresh["lr_scheduler_type"] == (str,) and fresh["learning_rate"] == (float, int)
    assert fresh["target_modules"] == (list, str) and "benchmark_warmup_steps" in fresh
    cached.write_text('{"r": ["complex"]}')  # torn or foreign: introspected again, and rewritten
    assert rc.training_argument_types() == fresh
    assert "complex" not in cached.read_text()
