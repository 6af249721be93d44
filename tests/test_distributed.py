"""Multi-process training on the CPU (gloo): DDP and FSDP give the single-process losses; the launch checks.

Equivalence: 2 ranks x per-device batch 4 draw the same 8 examples per step as 1 rank x 8 (accelerate
deals the sampler's batches out to the ranks in turn), so with dropout 0 and float32 the per-step loss
(averaged over ranks in ``metrics.json``) must match the single process's.

FSDP runs through ``distributed_fsdp_cpu_worker.py``: accelerate turns FSDP on only for accelerators,
so the worker lets it shard on the CPU mesh (everything else is the production path); a plain
``fmsaccel run`` with ``strategy: fsdp`` on the CPU must refuse, not quietly run DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fmsaccel_cli import distributed, launch, recipes
from fmsaccel_cli.recipes import RecipeError

from .conftest import REPO, cli

SHORT = ["max_steps=4", "save_strategy=no", "torch_dtype=float32", "lora_dropout=0", "logging_steps=1",
         "benchmark_warmup_steps=1"]
QLORA = "accelerated-peft-bnb-foak-padding-free"
GPTQ = "accelerated-peft-autogptq-foak-padding-free"


# ---------------------------------------------------------------------------------------------- settings


def test_settings_defaults():
    assert distributed.settings({}) == distributed.Settings()
    fsdp = distributed.settings({"distributed": {"strategy": "fsdp"}})
    assert fsdp.fsdp and fsdp.sharding == "full_shard" and fsdp.cpu_ram_efficient_loading
    assert fsdp.activation_checkpointing is None and not fsdp.offload_params


@pytest.mark.parametrize("section, message", [
    ({"strategy": "fdsp"}, "did you mean 'fsdp'"),
    ({"strategy": "fsdp", "fsdp": {"shardng": "full_shard"}}, "did you mean 'sharding'"),
    ({"stratgy": "fsdp"}, "did you mean 'strategy'"),
    ({"strategy": "fsdp", "fsdp": {"sharding": "hybrid_shard"}}, "FSDP1-only"),
    ({"strategy": "fsdp", "fsdp": {"offload_params": "yes"}}, "must be true or false"),
    ({"gather_step_metrics": "no"}, "gather_step_metrics = 'no' must be true or false"),
    ({"gather_metrics": True}, "did you mean 'gather_step_metrics'"),
    ("fsdp", "must be a mapping such as {strategy: fsdp}"),
])
def test_settings_errors_name_the_key(section, message):
    with pytest.raises(RecipeError, match=message):
        distributed.settings({"distributed": section}, "my.yaml")


class _Accelerator:
    def __init__(self, num_processes: int):
        self.num_processes = num_processes
        self.gathered = 0

    def gather_for_metrics(self, tensor):
        self.gathered += 1
        return tensor.repeat(self.num_processes)


def _trainer(num_processes: int, training: bool = True):
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=_Accelerator(num_processes), model=SimpleNamespace(training=training))


@pytest.mark.parametrize("num_processes, training, sets, local", [
    (2, True, {}, False),  # DDP training: TRL's behaviour by default
    (2, True, {"distributed": {"gather_step_metrics": False}}, True),  # on request: no cross-rank wait mid-step
    (2, False, {"distributed": {"gather_step_metrics": False}}, False),  # evaluation gathers as always
    (1, True, {"distributed": {"gather_step_metrics": False}}, False),  # one process: nothing to gather
])
def test_trl_step_metrics_stay_on_the_rank_under_ddp(num_processes, training, sets, local):
    import torch

    trainer = _trainer(num_processes, training)
    value = torch.tensor(3.0)
    with distributed.rank_local_metrics(trainer, distributed.settings(sets).gather_step_metrics):
        result = trainer.accelerator.gather_for_metrics(value)
    assert (result.shape == () and trainer.accelerator.gathered == 0) if local else \
        (result.shape == (num_processes,) and trainer.accelerator.gathered == 1)
    # the instance's own method is back afterwards
    assert trainer.accelerator.gather_for_metrics(value).shape == (num_processes,)


def test_rank_local_metrics_restores_the_gather_after_an_error():
    import torch

    trainer = _trainer(2)
    with pytest.raises(RuntimeError), distributed.rank_local_metrics(trainer, gather=False):
        raise RuntimeError("boom")
    assert trainer.accelerator.gather_for_metrics(torch.tensor(1.0)).shape == (2,)


# ---------------------------------------------------------------------------------------------- SFTConfig


def _sft_config(*sets: str, recipe: str = "accelerated-peft-bnb"):
    from fmsaccel_cli.train import build_sft_config

    return build_sft_config(recipes.resolve(recipe, sets=list(sets)).args)


def test_fsdp_config_wraps_decoder_layers_and_moves_checkpointing_to_fsdp():
    config = _sft_config("distributed.strategy=fsdp", "gradient_checkpointing=true")
    assert config.fsdp and config.fsdp_config["version"] == 2
    assert config.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    plugin = config.fsdp_plugin_args
    assert plugin["reshard_after_forward"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["activation_checkpointing"] is True and not config.gradient_checkpointing  # checkpoint once


def test_fsdp_reduces_gradients_in_fp32():
    """accelerate's default policy would average gradients in bf16; the policy it builds keeps fp32 for that."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from fmsaccel_cli.train import build_sft_config
    from fmsaccel_framework.plugin import TrainContext

    resolved = recipes.resolve("accelerated-peft-bnb", sets=["distributed.strategy=fsdp"])
    config = build_sft_config(resolved.args)
    ctx = TrainContext(args=resolved.args, torch_dtype=torch.bfloat16)
    distributed.before_model_load(config, ctx, None)
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
    plugin.set_mixed_precision("bf16")  # what accelerate's state does next: it must keep ours
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert any("gradients reduced in float32" in note for _, note in ctx.report.notes)


def test_fsdp_options_reach_accelerate():
    config = _sft_config("distributed.strategy=fsdp", "distributed.fsdp.sharding=shard_grad_op",
                         "distributed.fsdp.offload_params=true", "distributed.fsdp.activation_checkpointing=false",
                         "gradient_checkpointing=true", "model_name_or_path=tiny-mixtral", recipe="standard-peft")
    plugin = config.fsdp_plugin_args
    assert plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True
    assert plugin["activation_checkpointing"] is False and config.gradient_checkpointing  # transformers' stays
    assert plugin["transformer_cls_names_to_wrap"] == "MixtralDecoderLayer"


def test_ddp_skips_the_unused_parameter_search_except_for_moe():
    assert _sft_config().ddp_find_unused_parameters is False
    assert _sft_config("model_name_or_path=tiny-mixtral").ddp_find_unused_parameters is None  # experts may idle
    assert _sft_config("ddp_find_unused_parameters=true").ddp_find_unused_parameters is True  # the user's choice
    assert not _sft_config().fsdp


def test_ddp_does_not_broadcast_frozen_buffers_each_step():
    """GPTQ's packed weights are buffers: DDP's default would copy them from rank 0 before every forward."""
    assert _sft_config().ddp_broadcast_buffers is False
    assert _sft_config("ddp_broadcast_buffers=true").ddp_broadcast_buffers is True  # the user's choice


# ---------------------------------------------------------------------------------------------- launch checks


def _check(recipe: str, *sets: str, world: int = 2) -> list[str]:
    resolved = recipes.resolve(recipe, sets=list(sets))
    return distributed.check(resolved.args, recipes.validate(resolved), world, resolved.sources)


@pytest.mark.parametrize("recipe, sets, world, message", [
    ("accelerated-peft-bnb", ["distributed.strategy=fsdp"], 1, "pass --nproc-per-node N"),
    ("moe-scattermoe-granite-ep2", ["distributed.strategy=fsdp"], 2, "expert parallelism shards the experts"),
    ("moe-scattermoe-granite-ep4", [], 2, "does not divide the 2 process"),
    ("accelerated-peft-bnb", ["distributed.strategy=fsdp", "plugins.peft.quantization.bitsandbytes.quant_storage="
                              "float32"], 2, "must equal torch_dtype"),
    ("accelerated-peft-bnb", ["per_device_train_batch_size=0"], 2, "whole number >= 1"),
    ("accelerated-peft-bnb", ["gradient_accumulation_steps=0"], 2, "whole number >= 1"),
    ("aadp-padding-free-multipack", ["max_seq_length=null"], 2, "token budget"),
    ("aadp-padding-free-multipack", ["num_train_examples=1"], 2, "cannot give each of 2 ranks"),
])
def test_combinations_that_cannot_work_are_refused(recipe, sets, world, message):
    with pytest.raises(RecipeError, match=message):
        _check(recipe, *sets, world=world)


def test_notes_for_what_fsdp_does_with_4bit_weights():
    assert any("stored as bfloat16" in n for n in _check("accelerated-peft-bnb", "distributed.strategy=fsdp"))
    assert any("packed 4-bit tensors are held as torch_dtype parameters" in n
               for n in _check(GPTQ, "distributed.strategy=fsdp"))
    assert _check("accelerated-peft-bnb", "distributed.fsdp.sharding=full_shard") == [
        "distributed.fsdp options are ignored: distributed.strategy is ddp"]
    assert _check("moe-scattermoe-granite-ep2", world=4) == []


def test_reduce_metrics_is_the_identity_without_a_process_group():
    import torch

    assert distributed.reduce_metrics([torch.tensor(2.0), torch.tensor(1.5)], 10.0, 2.0) == ([2.0, 1.5], 10.0, 2.0)


@pytest.mark.parametrize("sets, message", [
    (["distributed.strategy=fdsp"], "distributed.strategy = 'fdsp' is not one of: ddp, fsdp; did you mean 'fsdp'?"),
    (["distributed.strategy=fsdp"], "one; pass --nproc-per-node N"),
])
def test_dry_run_errors_are_one_line(sets, message):
    args = ["run", "--recipe", "accelerated-peft-bnb", "--dry-run"]
    for item in sets:
        args += ["--set", item]
    out = cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- multi-process runs


def _metrics(out_dir) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def _run(recipe: str, out_dir, *sets: str, nproc: int = 1):
    args = ["run", "--recipe", recipe, "--output-dir", str(out_dir), "--nproc-per-node", str(nproc)]
    for item in [*SHORT, *sets]:
        args += ["--set", item]
    out = cli(*args, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return _metrics(out_dir), out.stdout


def _run_fsdp_worker(recipe: str, out_dir, *sets: str):
    """Two processes of the training entry point under real FSDP2 on gloo (see the module docstring)."""
    resolved = recipes.resolve(recipe, sets=[*SHORT, "distributed.strategy=fsdp", *sets],
                               overrides={"output_dir": str(out_dir)})
    launch.prepare(resolved, launch.LaunchOptions(nproc_per_node=2))
    config = launch.write_config(resolved, out_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(REPO / "tests" / "distributed_fsdp_cpu_worker.py"), str(config)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return _metrics(out_dir), out.stdout


def _same_losses(many: dict, one: dict) -> None:
    assert len(many["losses"]) == len(one["losses"]) == 4
    assert many["losses"] == pytest.approx(one["losses"], rel=1e-3), (many["losses"], one["losses"])


def _same_adapter(many_dir, one_dir) -> None:
    import torch
    from safetensors.torch import load_file

    many, one = load_file(many_dir / "adapter_model.safetensors"), load_file(one_dir / "adapter_model.safetensors")
    assert sorted(many) == sorted(one)  # a normal PEFT adapter: same names, full shapes
    for name, tensor in one.items():
        assert many[name].dtype == tensor.dtype
        # Adam moves a weight by about the learning rate per step whatever its gradient's size, so single weights
        # with near-zero gradients may end a step apart; the tensor as a whole must agree (bf16 LoRA: its rounding)
        limit = 5e-2 if tensor.dtype in (torch.bfloat16, torch.float16) else 1e-3
        error = (many[name].float() - tensor.float()).norm() / tensor.float().norm()
        assert error < limit, (name, float(error))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The 1-process reference runs (per-device batch 8), made once per recipe."""
    runs: dict[str, tuple] = {}

    def get(recipe: str):
        if recipe not in runs:
            out_dir = tmp_path_factory.mktemp(f"one-{recipe}")
            runs[recipe] = (*_run(recipe, out_dir, "per_device_train_batch_size=8"), out_dir)
        return runs[recipe]

    return get


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, single_process):
    one, _, _ = single_process(QLORA)
    many, stdout = _run(QLORA, tmp_path, "per_device_train_batch_size=4", nproc=2)
    _same_losses(many, one)
    assert many["world_size"] == 2 and "DDP over 2 processes, find_unused_parameters off" in stdout
    assert "are each rank's own" not in stdout  # TRL gathers its metrics by default (gather_step_metrics)
    # tokens/s counts every rank: the same global batches hold the same tokens
    assert many["measured_tokens"] == one["measured_tokens"] > 0
    total = many["measured_tokens"] / many["measured_seconds"]
    assert many["train_tokens_per_second_total"] == pytest.approx(total)
    assert many["train_tokens_per_second"] == pytest.approx(total / 2)


@pytest.mark.slow
def test_ddp_with_the_activation_budget_matches_one_process(tmp_path, single_process):
    """Each rank plans its own unchecked layers from its own tokens; checkpointing changes no number."""
    one, _, _ = single_process(QLORA)
    many, stdout = _run(QLORA, tmp_path, "per_device_train_batch_size=4", "gradient_checkpointing=true",
                        "plugins.peft.quantization.fused_ops_and_kernels.activation_budget_gib=0.002", nproc=2)
    assert "of activations kept, the last layers unchecked per step" in stdout
    _same_losses(many, one)


@pytest.mark.slow
def test_fsdp_qlora_with_fused_lora_matches_one_process_and_saves_a_peft_adapter(tmp_path, single_process):
    one, _, one_dir = single_process(QLORA)
    many, stdout = _run_fsdp_worker(QLORA, tmp_path, "per_device_train_batch_size=4", "gradient_checkpointing=true")
    _same_losses(many, one)
    assert "FSDP2 over 2 processes: full_shard, one shard unit per LlamaDecoderLayer" in stdout
    assert "FSDP activation checkpointing per decoder layer" in stdout
    assert many["measured_tokens"] == one["measured_tokens"]
    _same_adapter(tmp_path, one_dir)


@pytest.mark.slow
def test_fsdp_gptq_lora_matches_one_process(tmp_path, single_process):
    one, _, one_dir = single_process(GPTQ)
    many, stdout = _run_fsdp_worker(GPTQ, tmp_path, "per_device_train_batch_size=4")
    _same_losses(many, one)
    assert "accelerated-peft-gptq loads its 4-bit checkpoint on every rank" in stdout
    assert "QuantLinear packed tensors held as float32 parameters (FSDP shards them)" in stdout
    _same_adapter(tmp_path, one_dir)


@pytest.mark.slow
def test_fsdp_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path):
    out = cli("run", "--recipe", "standard-peft", "--output-dir", str(tmp_path), "--nproc-per-node", "2",
              "--set", "distributed.strategy=fsdp", *[x for item in SHORT for x in ("--set", item)], timeout=300)
    assert out.returncode != 0
    assert "accelerate did not enable FSDP (it runs FSDP on GPUs only" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "metrics.json").exists()


def test_a_process_that_ran_a_gloo_group_leaves_with_its_exit_code_and_flushed_output():
    """``exit_process`` skips interpreter shutdown after a gloo group (see train._gloo_threads_left), losing nothing."""
    script = (
        "import os, sys, torch.distributed as dist\n"
        "from fmsaccel_cli import train\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "train._close_process_group()\n"
        "print('written', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "train.exit_process(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=os.environ.copy())
    assert out.returncode == 3, out.stderr
    assert out.stdout == "written" and out.stderr.endswith("to stderr")
