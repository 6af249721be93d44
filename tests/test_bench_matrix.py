"""Expansion of scenarios files into benchmark cells (no processes are started here)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from fmsaccel_cli.bench.matrix import BenchError, expand, load_defaults, load_scenarios, yaml_value
from fmsaccel_cli.recipes import catalog

REPO = Path(__file__).resolve().parents[1]

# Written the way the seed writes them: an empty framework_config entry, a model list, a space-separated
# target_modules string, a slow scenario, and a null that drops a default.
SEED_STYLE = """
scenarios:
    -   name: full-finetuning
        arguments:
            learning_rate: 2e-5
            model_name_or_path:
                - 'mistral-7b'
                - 'llama3-8b'
            torch_dtype: float16
            gradient_checkpointing: null

    -   name: standard-peft
        framework_config:
            -
            - foak-fast-kernels
        arguments:
            learning_rate: 2e-4
            peft_method: lora
            r: 16
            lora_alpha: 16
            target_modules: "q_proj k_proj v_proj o_proj"
            model_name_or_path:
                - 'mistral-7b'

    -   name: accelerated-moe-full
        framework_config:
            - # without acceleration
            - moe-scattermoe-granite-ep1
        slow: True
        arguments:
            learning_rate: 5e-5
            gradient_accumulation_steps: null
            per_device_train_batch_size: 8
            model_name_or_path:
                - 'granite-3.0-3b-a800m'
"""

DEFAULTS = {"gradient_checkpointing": True, "max_steps": 20, "logging_steps": 10, "output_dir": "ignored"}


def _write(tmp_path: Path, text: str, name: str = "scenarios.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_file_expands_to_every_combination(tmp_path):
    scenarios = load_scenarios(_write(tmp_path, SEED_STYLE))
    cells, impossible = expand(scenarios, DEFAULTS, effective_batch_sizes=[4, 8], num_gpus=[1, 2])
    assert impossible == []
    # full-finetuning: 2 models x 2 batches x 2 GPU counts; standard-peft: 2 configs x 1 model x 2 x 2; slow: none
    assert len(cells) == 8 + 8
    assert {c.scenario for c in cells} == {"full-finetuning", "standard-peft"}
    full = [c for c in cells if c.scenario == "full-finetuning"]
    assert {c.model_name_or_path for c in full} == {"mistral-7b", "llama3-8b"}
    assert {(c.effective_batch_size, c.num_gpus, c.per_device_train_batch_size) for c in full} == {
        (4, 1, 4), (4, 2, 2), (8, 1, 8), (8, 2, 4)
    }
    first = full[0]
    assert first.recipe == "full-finetuning" and first.framework_config == ""
    assert first.arguments["gradient_checkpointing"] is None  # null drops the default: passed on as key=null
    assert "gradient_checkpointing=null" in first.set_items()
    assert "output_dir" not in first.arguments  # each cell gets its own --output-dir
    assert first.arguments["max_steps"] == 20 and first.arguments["learning_rate"] == 2e-5
    peft = [c for c in cells if c.scenario == "standard-peft"]
    assert [c.recipe for c in peft[:1]] + [c.recipe for c in peft[-1:]] == ["standard-peft", "foak-fast-kernels"]
    assert peft[0].arguments["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_cell_command_round_trips_through_yaml(tmp_path):
    cells, _ = expand(load_scenarios(_write(tmp_path, SEED_STYLE)), DEFAULTS, effective_batch_sizes=[8], num_gpus=[2])
    cell = next(c for c in cells if c.recipe == "foak-fast-kernels")
    cmd = cell.command(["fmsaccel", "run"], tmp_path / "cell")
    assert cmd[:8] == ["fmsaccel", "run", "--recipe", "foak-fast-kernels", "--yes", "--output-dir",
                       str(tmp_path / "cell"), "--nproc-per-node"]
    assert cmd[8] == "2"
    sets = dict(item.split("=", 1) for item in cmd[cmd.index("--set") + 1 :: 2])
    parsed = {k: yaml.safe_load(v) for k, v in sets.items()}
    assert parsed == cell.arguments
    assert parsed["per_device_train_batch_size"] == 4 and parsed["learning_rate"] == 2e-4


@pytest.mark.parametrize(
    "value",
    [1e-5, 2.0e-4, 3.0, 1e20, -0.5, 7, True, None, "no", "null", "1.0", "workload:R", "a: b", "\n### Response:",
     "x,y", "", ["q_proj", "v_proj"], {"num_hidden_layers": 2, "name": "on"}],
)
def test_yaml_value_round_trips(value):
    assert yaml.safe_load(yaml_value(value)) == value


def test_slow_scenarios_run_only_when_named(tmp_path):
    scenarios = load_scenarios(_write(tmp_path, SEED_STYLE))
    named, impossible = expand(scenarios, DEFAULTS, effective_batch_sizes=[8, 16], num_gpus=[1, 2],
                               run_only_scenarios=["accelerated-moe-full"])
    assert {c.scenario for c in named} == {"accelerated-moe-full"}
    # the scenario fixes the per-device batch and nulls gradient accumulation: accumulation makes up the rest,
    # and the one combination it cannot reach is left out and reported
    assert {(c.effective_batch_size, c.num_gpus, c.arguments["gradient_accumulation_steps"]) for c in named} == {
        (8, 1, 1), (16, 1, 2), (16, 2, 1)
    }
    assert impossible == ["scenario 'accelerated-moe-full': effective batch 8 is not a multiple of its "
                          "per_device_train_batch_size 8 x 2 GPU(s)"]
    by_recipe, _ = expand(scenarios, DEFAULTS, effective_batch_sizes=[8], num_gpus=[1],
                          recipes=["moe-scattermoe-granite-ep1"])
    assert [c.recipe for c in by_recipe] == ["moe-scattermoe-granite-ep1"]


def test_fixed_batch_and_accumulation_do_not_repeat_cells(tmp_path):
    path = _write(tmp_path, """
        scenarios:
          - name: fixed
            arguments: {model_name_or_path: tiny-llama, per_device_train_batch_size: 2, gradient_accumulation_steps: 3}
    """)
    cells, _ = expand(load_scenarios(path), {}, effective_batch_sizes=[4, 8], num_gpus=[1, 2])
    assert [(c.num_gpus, c.effective_batch_size) for c in cells] == [(1, 6), (2, 12)]


def test_filters_and_overrides(tmp_path):
    scenarios = load_scenarios(_write(tmp_path, SEED_STYLE))
    cells, _ = expand(scenarios, DEFAULTS, effective_batch_sizes=[4], num_gpus=[1], recipes=["none"],
                      models=["tiny-llama"],
                      overrides={"max_steps": 3, "training_data_path": ["workload:P", "workload:R"]})
    assert [(c.recipe, c.training_data_path) for c in cells] == [
        ("full-finetuning", "workload:P"), ("full-finetuning", "workload:R"),
        ("standard-peft", "workload:P"), ("standard-peft", "workload:R"),
    ]
    assert all(c.model_name_or_path == "tiny-llama" and c.arguments["max_steps"] == 3 for c in cells)
    assert len({c.cell_id for c in cells}) == len({c.dir_name for c in cells}) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_only_scenarios": ["standard-pef"]}, "no scenario 'standard-pef'.*did you mean 'standard-peft'"),
        ({"recipes": ["accelerated-peft-bnb"]}, "no scenario runs 'accelerated-peft-bnb'"),
        ({"num_gpus": [0]}, "--num-gpus: expected positive integers"),
    ],
)
def test_bad_options_are_errors(tmp_path, kwargs, message):
    scenarios = load_scenarios(_write(tmp_path, SEED_STYLE))
    with pytest.raises(BenchError, match=message):
        expand(scenarios, DEFAULTS, **kwargs)


def test_a_batch_that_cannot_split_is_left_out_and_reported(tmp_path):
    scenarios = load_scenarios(_write(tmp_path, SEED_STYLE))
    cells, impossible = expand(scenarios, DEFAULTS, effective_batch_sizes=[3, 4], num_gpus=[2],
                               run_only_scenarios=["standard-peft"])
    assert {c.effective_batch_size for c in cells} == {4}
    assert impossible == ["scenario 'standard-peft': effective batch 3 does not split over 2 GPU(s)"]


def test_unknown_shortname_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, """
        scenarios:
          - name: typo
            framework_config: [accelerated-peft-bnb-foak, accelerated-peft-bnb-foack]
            arguments: {model_name_or_path: tiny-llama}
    """)
    with pytest.raises(BenchError, match="unknown framework_config 'accelerated-peft-bnb-foack'.*did you mean"):
        load_scenarios(path)


def test_malformed_files_are_errors(tmp_path):
    with pytest.raises(BenchError, match="top-level 'scenarios:'"):
        load_scenarios(_write(tmp_path, "name: x\n"))
    with pytest.raises(BenchError, match="needs an 'arguments:' mapping"):
        load_scenarios(_write(tmp_path, "scenarios:\n  - name: x\n"))
    with pytest.raises(BenchError, match="no model_name_or_path"):
        expand(load_scenarios(_write(tmp_path, "scenarios:\n  - name: x\n    arguments: {r: 8}\n")), {})
    with pytest.raises(BenchError, match="file not found"):
        load_defaults(tmp_path / "missing.yaml")


def test_shipped_benchmark_matrix_covers_every_recipe():
    scenarios = load_scenarios(REPO / "benchmarks" / "scenarios.yaml")
    defaults = load_defaults(REPO / "benchmarks" / "defaults.yaml")
    everything, _ = expand(scenarios, defaults, effective_batch_sizes=[4], num_gpus=[1],
                        run_only_scenarios=[s.name for s in scenarios])
    assert {c.recipe for c in everything} == set(catalog())
    default_run, _ = expand(scenarios, defaults, effective_batch_sizes=[4], num_gpus=[1])
    assert all(not s.slow for s in scenarios if s.name in {c.scenario for c in default_run})
    assert {c.training_data_path for c in default_run} == {"workload:P", "workload:R"}
    baseline = [c for c in default_run if c.recipe == "baseline-peft-bnb"]
    assert {c.model_name_or_path for c in baseline} == {"llama3-8b"}
    for cell in default_run:
        assert cell.arguments["max_steps"] == 12 and cell.arguments["benchmark_warmup_steps"] == 4
        assert cell.arguments["gradient_checkpointing"] is True and cell.arguments["torch_dtype"] == "bfloat16"
        if cell.arguments.get("peft_method") == "lora":
            assert cell.arguments["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
            assert (cell.arguments["r"], cell.arguments["lora_alpha"], cell.arguments["lora_dropout"]) == (16, 16, 0.1)
