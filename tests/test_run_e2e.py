"""End to end through torchrun on the CPU: the embedded default, 2 processes, resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, cli

pytestmark = pytest.mark.slow


def _metrics(out_dir) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def test_embedded_default_qlora_trains_and_saves(tmp_path):
    out = cli("run", "--recipe", "accelerated-peft-bnb", "--output-dir", str(tmp_path), "--set", "max_steps=40",
              "--set", "save_strategy=no")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = _metrics(tmp_path)
    losses = m["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # the loss visibly falls
    assert m["train_tokens_per_second"] > 0
    assert m["plugins"] == ["accelerated-peft-bnb", "attention-and-distributed-packing"]
    assert m["patch_report"]["patches"][0]["what"].startswith("bnb.nn.Linear4bit")
    assert "attention -> sdpa, cuDNN unpadded: 4" in out.stdout  # tiny-llama has 4 layers
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert (tmp_path / "fmsaccel-config.yaml").exists()
    assert "patch report" in out.stdout and "Linear4bit (nf4) wrapped by LoRA: 16" in out.stdout
    assert list(m["phase_seconds"]) == ["startup", "data_and_model", "trainer", "train", "save"]
    assert 0 < m["phase_seconds"]["startup"] < 300  # torchrun, imports: from the launch to the first phase
    assert all(v >= 0 for v in m["phase_seconds"].values())
    assert m["host_cpu"].endswith(" cores)")  # launch-bound figures move with the host's CPU
    # where a measured step's wall time goes: the phases add up to the measured time (38 steps after 2 warm-up)
    step = m["step_seconds"]
    assert list(step) == ["forward_backward", "optimizer", "step_end", "between_steps"] and min(step.values()) >= 0
    assert 0.8 * m["measured_seconds"] <= sum(step.values()) * 38 <= m["measured_seconds"] + 0.05
    assert step["forward_backward"] > step["optimizer"]
    # every step's own wall time (40 steps, warm-up included), with the garbage collector's share of it
    assert len(m["step_times"]) == len(m["gc_seconds"]) == 40
    assert all(0 <= pause <= t for pause, t in zip(m["gc_seconds"], m["step_times"], strict=True))
    assert m["gc_frozen_objects"] > 10_000  # the model, data and trainer, frozen before training
    assert 0.5 < m["train_tokens_per_second_median_step"] / m["train_tokens_per_second"] < 2
    assert sum(m["step_times"][2:]) == pytest.approx(38 * (step["forward_backward"] + step["optimizer"]
                                                           + step["step_end"]), rel=0.01, abs=0.01)



def test_the_p_recipe_as_shipped_trains_under_checkpointing(tmp_path):
    """``accelerated-peft-bnb-foak`` as the P benchmark runs it (checkpointing, the trainer logging every 10 steps, a
    progress line every step): offloaded MLP activations (at this run's few tokens too), kernel-drawn dropout, the loss
    filter on the device."""
    out = cli("run", "--recipe", "accelerated-peft-bnb-foak", "--output-dir", str(tmp_path), "--set", "max_steps=3",
              "--set", "plugins.peft.quantization.fused_ops_and_kernels.offload_min_tokens=1",
              "--set", "save_strategy=no", "--set", "gradient_checkpointing=true", "--set", "logging_steps=10",
              "--set", "progress_steps=1", "--set", "per_device_train_batch_size=2", "--set", "max_seq_length=64")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _metrics(tmp_path)["losses"]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses), losses
    assert "trainer NaN/Inf loss filter -> on the device" in out.stdout
    assert "offloaded to host memory for the recompute (of 3 eligible; steps of 1+ tokens)" in out.stdout
    progress = [json.loads(line.split("FMSACCEL_PROGRESS")[1]) for line in out.stdout.splitlines()
                if "FMSACCEL_PROGRESS" in line]
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert [p["loss"] for p in progress] == pytest.approx(losses, rel=1e-5)

def test_baseline_and_two_processes_on_gloo(tmp_path):
    out = cli("run", "--recipe", "baseline-peft-bnb", "--output-dir", str(tmp_path), "--nproc-per-node", "2",
              "--set", "max_steps=6", "--set", "save_strategy=no")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = _metrics(tmp_path)
    assert m["world_size"] == 2 and len(m["losses"]) == 6
    assert "LoRA and k-bit preparation left to TRL" in out.stdout


def test_full_finetuning_on_alpaca_json_and_chat_data(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 8))
    out = cli("run", "--recipe", "full-finetuning", "--output-dir", str(tmp_path / "full"), "--data", str(data),
              "--set", "max_steps=3", "--set", "save_strategy=no", "--set", "per_device_train_batch_size=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "full" / "model.safetensors").exists()
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                                       {"role": "assistant", "content": "4"}]}) for _ in range(8)))
    out = cli("run", "--recipe", "standard-peft", "--output-dir", str(tmp_path / "chat"), "--data", str(chat),
              "--set", "max_steps=3", "--set", "save_strategy=no", "--set", "per_device_train_batch_size=2")
    assert out.returncode == 0, out.stderr[-3000:]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    args = ["--recipe", "accelerated-peft-bnb", "--output-dir", str(tmp_path), "--set", "max_steps=400",
            "--set", "save_steps=1000", "--set", "logging_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "fmsaccel_cli.main", "run", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if '"step": 5,' in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "".join(seen)[-2000:] + rest[-2000:]
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints, rest[-3000:]
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 5 <= stopped_at < 400
    assert not (tmp_path / "metrics.json").exists()
    time.sleep(1)
    out = cli("run", *args[:-4], "--set", "max_steps=" + str(stopped_at + 5), "--set", "logging_steps=1", "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from {checkpoints[-1]}" in out.stdout
    assert len(_metrics(tmp_path)["losses"]) == 5  # only the remaining steps ran


@pytest.mark.parametrize("model", ["tiny-granitemoe", "tiny-mixtral"])
def test_plain_moe_models_train_with_trls_load_balancing_loss(tmp_path, model):
    """Without plugins too: TRL's loss forward reads config.num_experts, which these configs name otherwise."""
    out = cli("run", "--recipe", "standard-peft", "--model", model, "--output-dir", str(tmp_path), "--set",
              "max_steps=2", "--set", "save_strategy=no", "--set", "per_device_train_batch_size=2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(_metrics(tmp_path)["losses"]) == 2
