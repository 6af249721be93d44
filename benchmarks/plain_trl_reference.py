"""Plain TRL QLoRA, as users run it today: the reference `baseline-peft-bnb` must reproduce.

    python benchmarks/plain_trl_reference.py --model llama3-8b --workload P --out results.jsonl

No fmsaccel code in the training path: ``from_pretrained`` with a bitsandbytes nf4
config, ``SFTTrainer`` with a ``peft_config`` and TRL's defaults. Only the model
folder (a random-initialised checkpoint of a real shape) and the pre-tokenised
workload come from fmsaccel, so both sides train on identical inputs. Tokens/s
counts non-padding tokens after the warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from fmsaccel_cli.models import materialize
from fmsaccel_cli.workloads import build_workload


class Throughput(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.t0, self.tokens0 = warmup, 0, None, 0
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0, self.tokens0 = time.perf_counter(), float(self.tokens)

    def on_train_begin(self, args, state, control, **kwargs):
        torch.cuda.reset_peak_memory_stats()  # as fmsaccel's train.py: peak over training, not loading

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workload", choices=["P", "R"], default="P")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    path = materialize(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    # the examples `fmsaccel run` generates for a workload (max_steps x 64, seed 42), so the Trainer's shuffled
    # batches are the same ones: on R, tokens per step (and so tokens/s) depend on which examples meet
    rows = build_workload(a.workload, vocab_size=vocab, num_examples=a.steps * 64, seed=42)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    counter = Throughput(a.warmup)

    def count(module, args, kwargs):  # a device tensor: no host sync per step (R is launch-bound)
        mask = kwargs.get("attention_mask")
        counter.tokens += mask.sum() if mask is not None else kwargs["input_ids"].numel()

    config = SFTConfig(output_dir="/tmp/plain-trl", per_device_train_batch_size=a.batch, max_steps=a.steps,
                       learning_rate=2e-4, save_strategy="no", report_to="none", max_length=4096,  # TRL's logging_steps
                       gradient_checkpointing=not a.no_gradient_checkpointing, use_liger_kernel=a.liger)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                         callbacks=[counter])
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - counter.t0
    row = {"framework_config": "plain-trl" + ("-liger" if a.liger else ""), "model_name_or_path": a.model,
           "workload": a.workload, "per_device_train_batch_size": a.batch,
           "gradient_checkpointing": not a.no_gradient_checkpointing,
           "train_tokens_per_second": (float(counter.tokens) - counter.tokens0) / elapsed,
           "mem_peak_torch_mem_alloc_in_bytes": torch.cuda.max_memory_allocated(),
           "final_loss": counter.losses[-1] if counter.losses else None, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__}
    print("PLAIN_TRL " + json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
