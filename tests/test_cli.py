"""The CLI as users drive it: subprocesses, exit codes, one-line errors, no torch on --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, cli


def _imported_modules(code: str, env: dict | None = None) -> set[str]:
    probe = code + "\nimport sys, json\nprint('MODULES=' + json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MODULES="))
    import json

    return set(json.loads(line[len("MODULES="):]))


HEAVY = {"torch", "transformers", "trl", "peft", "bitsandbytes", "triton"}


def test_help_does_not_import_torch():
    mods = _imported_modules(
        "from fmsaccel_cli.main import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert not HEAVY & mods, HEAVY & mods


def test_completion_of_recipe_names_does_not_import_torch():
    env = {"_FMSACCEL_COMPLETE": "complete_bash", "COMP_WORDS": "fmsaccel run --recipe accelerated-peft-auto",
           "COMP_CWORD": "3"}
    code = ("from fmsaccel_cli.main import app\n"
            "try:\n    app(prog_name='fmsaccel')\nexcept SystemExit:\n    pass")
    mods = _imported_modules(code, env)
    assert not HEAVY & mods
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env})
    assert "accelerated-peft-autogptq" in out.stdout and "accelerated-peft-autogptq-foak" in out.stdout
    assert "accelerated-peft-bnb" not in out.stdout


def test_recipes_list_and_show():
    out = cli("recipes", "list", env={"COLUMNS": "200"})
    assert out.returncode == 0 and "baseline-peft-bnb" in out.stdout and "accelerated-peft-autogptq" in out.stdout
    out = cli("recipes", "show", "accelerated-peft-bnb", "--set", "r=8", env={"COLUMNS": "200"})
    assert out.returncode == 0
    row = next(ln for ln in out.stdout.splitlines() if "│ r " in ln)
    assert "8" in row and "--set" in row


def test_recipes_cp_then_validate(tmp_path):
    path = tmp_path / "mine.yaml"
    assert cli("recipes", "cp", "accelerated-peft-bnb-foak", str(path)).returncode == 0
    assert yaml.safe_load(path.read_text())["recipe"] == "accelerated-peft-bnb-foak"
    out = cli("recipes", "validate", str(path))
    assert out.returncode == 0 and "accelerated-peft-bnb" in out.stdout
    text = path.read_text().replace("fast_rms_layernorm", "fast_rsm_layernorm")
    path.write_text(text)
    out = cli("recipes", "validate", str(path), env={"COLUMNS": "300"})
    assert out.returncode == 2
    assert "did you mean 'fast_rms_layernorm'" in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--recipe", "acelerated-peft-bnb", "--dry-run"], "did you mean 'accelerated-peft-bnb'"),
        (["run", "--set", "learning_rat=1e-3", "--dry-run"], "unknown argument 'learning_rat'"),
        (["run", "--model", "/nonexistent/model", "--no-install"], "model '/nonexistent/model' not found"),
        (["run", "--model", "llama3-8bb", "--no-install"], "did you mean 'llama3-8b'"),
        (["run", "--set", "plugins.peft.quantization.bitsandbytes.quant_type=nf5", "--dry-run"], "is not one of"),
        (["plugins", "install", "accelerated-pef"], "unknown plugin 'accelerated-pef'"),
        (["run", "--set", "torch_dtype=fp16", "--dry-run"], "torch_dtype 'fp16' is not one of"),
        (["run", "--data", "workload:Q", "--dry-run"], "unknown workload 'Q'"),
        (["run", "--set", "output_dir=null", "--dry-run"], "output_dir must be a folder path"),
        (["run", "--nnodes", "2", "--dry-run"], "needs --master-addr"),
        (["run", "--set", "max_steps.x=1", "--dry-run"], "argument max_steps is 60, not a mapping"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    out = cli(*args, env={"COLUMNS": "300"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_dry_run_prints_config_and_exact_command(tmp_path):
    out = cli("run", "--recipe", "accelerated-peft-bnb", "--output-dir", str(tmp_path / "o"), "--dry-run",
              "--nproc-per-node", "2", "--set", "max_steps=3", env={"COLUMNS": "400"})
    assert out.returncode == 0, out.stderr
    assert "quant_type: nf4" in out.stdout and "max_steps: 3" in out.stdout
    assert ("-m torch.distributed.run --nproc-per-node=2 --standalone -m fmsaccel_cli.train "
            f"{tmp_path / 'o' / 'fmsaccel-config.yaml'}") in out.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_multinode_command_line():
    from pathlib import Path

    from fmsaccel_cli.launch import LaunchOptions, torchrun_command

    cmd = torchrun_command(Path("c.yaml"), LaunchOptions(nproc_per_node=8, nnodes=2, node_rank=1,
                                                        master_addr="10.0.0.1", master_port=29600))
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd
    cmd = torchrun_command(Path("c.yaml"), LaunchOptions(nnodes=2, rdzv_endpoint="h:1234", resume=True))
    assert "--rdzv-endpoint=h:1234" in cmd and cmd[-1] == "--resume"


def test_missing_extra_is_installed_visibly_or_refused(monkeypatch, capsys):
    from fmsaccel_cli import launch
    from fmsaccel_cli.recipes import RecipeError
    from fmsaccel_framework import PluginSpec

    spec = PluginSpec(name="needs-missing", description="", paths={}, factory="x:y",
                      requires=("surely_not_installed_module",), extra="peft")
    missing = launch.missing_extras([(spec, {})])
    assert missing[0][1] == ["surely_not_installed_module"] and missing[0][2][-1] == "fmsaccel[peft]"
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    launch.install([missing[0][2]], assume_yes=True, confirm=lambda q: False)
    assert calls and "installing a missing plugin extra" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="declined"):
        launch.install([missing[0][2]], assume_yes=False, confirm=lambda q: False)


def test_plugins_list_and_env():
    out = cli("plugins", "list", env={"COLUMNS": "300"})
    assert out.returncode == 0
    for name in ("accelerated-peft-bnb", "accelerated-peft-gptq", "fused-ops-and-kernels",
                 "attention-and-distributed-packing", "accelerated-moe"):
        assert name in out.stdout
    out = cli("env", env={"COLUMNS": "300"})
    assert out.returncode == 0 and "transformers" in out.stdout and "plugins" in out.stdout


def test_worker_user_error_is_one_line_without_torchrun_traceback(tmp_path):
    out = cli("run", "--recipe", "accelerated-peft-bnb", "--model", "tiny-mixtral", "--output-dir", str(tmp_path),
              "--set", "max_steps=2", "--set", "target_modules=[q_proj,experts]")
    assert out.returncode == 2
    assert "[fmsaccel] error: accelerated-moe: LoRA on experts needs lora_dropout=0" in out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr


def test_a_recipe_copy_runs_its_own_recipe(tmp_path):
    copy = tmp_path / "ff.yaml"
    assert cli("recipes", "cp", "full-finetuning", str(copy)).returncode == 0
    out = cli("run", "--config", str(copy), "--dry-run", env={"COLUMNS": "300"})
    assert out.returncode == 0 and "recipe: full-finetuning" in out.stdout and "bitsandbytes" not in out.stdout
    out = cli("run", "--recipe", "accelerated-peft-bnb", "--config", str(copy), "--dry-run", env={"COLUMNS": "300"})
    assert out.returncode == 2 and "is a copy of recipe 'full-finetuning'" in out.stderr
