"""The training entry point, run by torchrun: ``python -m fmsaccel_cli.train CONFIG.yaml [--resume]``.

tokenizer → model (a loader plugin or ``from_pretrained``) → plugins augment it →
TRL ``SFTTrainer`` → train → adapter/model, tokenizer and ``metrics.json``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from fmsaccel_framework.plugin import AccelerationFramework, PluginError, TrainContext

from . import data, distributed, models, moe_compat, recipes
from .run_metrics import Phases, RunMetrics, host_cpu, is_main_process, log, versions

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": torch.bfloat16}
# fms-hf-tuning names -> SFTConfig names
RENAMED = {"evaluation_strategy": "eval_strategy", "max_seq_length": "max_length"}
NOT_SFT = set(recipes.EXTRA_ARGUMENTS) | {"r", "lora_alpha", "lora_dropout", "target_modules", "bias"}


def build_sft_config(args: dict[str, Any]) -> SFTConfig:
    import dataclasses

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    kwargs = {RENAMED.get(k, k): v for k, v in args.items() if k not in NOT_SFT or k in RENAMED}
    kwargs = {k: v for k, v in kwargs.items() if k in names}
    kwargs["max_length"] = int(args.get("max_seq_length") or args.get("max_length") or 1024)
    kwargs.setdefault("report_to", "none")
    kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    kwargs["remove_unused_columns"] = False
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs.setdefault("ddp_backend", "gloo")
    if kwargs.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in kwargs:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    dtype = args.get("torch_dtype", "bfloat16")
    if dtype == "float16":
        kwargs["bf16"], kwargs["fp16"] = False, True
    elif dtype == "float32":
        kwargs["bf16"] = kwargs["fp16"] = False
    distributed.apply_to_sft_config(kwargs, args)  # ddp/fsdp settings from the `distributed` section
    return SFTConfig(**kwargs)


def build_lora_config(args: dict[str, Any]):
    if args.get("peft_method") in (None, "none"):
        return None
    if args["peft_method"] != "lora":
        raise PluginError(f"peft_method '{args['peft_method']}' is not supported (lora, or null for full fine-tuning)")
    import dataclasses

    from peft import LoraConfig

    # every LoraConfig field the recipe sets (validation accepted them all), over fmsaccel's defaults
    fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"task_type", "peft_type"}
    kwargs = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    kwargs.update({k: v for k, v in args.items() if k in fields and v is not None})
    try:
        return LoraConfig(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as e:
        raise PluginError(f"invalid LoRA settings: {str(e).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in argv
    config_path = Path([a for a in argv if not a.startswith("--")][0])
    cfg = yaml.safe_load(config_path.read_text())
    args: dict[str, Any] = cfg["arguments"]
    try:
        return _train(cfg, args, resume)
    except (PluginError, data.DataError, recipes.RecipeError, FileNotFoundError) as e:
        print(f"[fmsaccel] error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit (left to interpreter shutdown, NCCL warns and may linger)."""
    import torch.distributed as dist

    global _gloo_threads_left
    if dist.is_available() and dist.is_initialized():
        _gloo_threads_left = dist.get_backend() == "gloo"
        dist.destroy_process_group()


# After a training run, something (not in Python's reach: not found by gc) still holds the gloo group after
# destroy_process_group, so its worker threads live on into interpreter shutdown, where a CPU rank of the FSDP test
# aborted once in CI after saving everything ("terminate called without an active exception"; the launcher then
# reports a failed run). A bare group's threads end with it. Such a process leaves without finalisation.
_gloo_threads_left = False


def exit_process(rc: int) -> NoReturn:
    """Leave the training process with ``rc``: ``os._exit`` after flushing where gloo's threads outlived the group."""
    if _gloo_threads_left:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def _train(cfg: dict[str, Any], args: dict[str, Any], resume: bool) -> int:
    phases = Phases()  # where a run's wall time goes besides training (benchmark cells pay it every time)
    active = recipes.active_plugins(cfg.get("plugins") or {})
    framework = AccelerationFramework(active)
    for line in framework.describe():
        log(line)
    torch.manual_seed(int(args.get("seed", 42)))
    dtype = DTYPES[str(args.get("torch_dtype", "bfloat16"))]
    model_path = models.resolve_model_path(args["model_name_or_path"], args.get("shape_overrides"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sft_config = build_sft_config(args)
    ctx = TrainContext(args=args, torch_dtype=dtype, tokenizer=tokenizer, peft_config=build_lora_config(args),
                       sft_config=sft_config)

    config_vocab = json.loads((model_path / "config.json").read_text()).get("vocab_size", len(tokenizer))
    rows = data.load_rows(args["training_data_path"], args, vocab_size=int(config_vocab))
    train_rows = data.tokenize_rows(rows, tokenizer, args)
    from datasets import Dataset

    dataset = Dataset.from_list(train_rows)

    attn = args.get("attn_implementation") or ("flash_attention_2" if args.get("use_flash_attn") and
                                               _has_flash_attn() else "sdpa")
    ctx.extras["attn_implementation"] = attn
    ctx.extras["example_lengths"] = [len(row["input_ids"]) for row in train_rows]  # tokens per example
    distributed.before_model_load(sft_config, ctx, framework.loader.name if framework.loader is not None else None)
    if framework.loader is not None:
        model = framework.load_model(str(model_path), ctx)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
    model = framework.augment(model, ctx)
    moe_compat.name_experts_for_trl(model)
    moe_compat.record_router_logits(model)
    phases.mark("data_and_model")

    progress_steps = args.get("progress_steps")
    metrics = RunMetrics(int(args.get("benchmark_warmup_steps", 2)), int(progress_steps) if progress_steps else None)
    signal.signal(signal.SIGTERM, lambda *_: setattr(metrics, "stop_requested", True))

    gather_step_metrics = distributed.settings(args).gather_step_metrics

    class Trainer(SFTTrainer):
        def compute_loss(self, *a, **kw):
            with distributed.rank_local_metrics(self, gather_step_metrics):
                return super().compute_loss(*a, **kw)

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            metrics.record_loss(loss)
            return loss

    trainer = Trainer(
        model=model,
        args=sft_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=ctx.peft_config,
        data_collator=framework.data_collator(ctx),
        callbacks=[metrics, *framework.callbacks(model, ctx)],
    )
    distributed.verify(trainer, ctx)
    framework.prepare_trainer(trainer, ctx)
    trainer.model.register_forward_pre_hook(metrics.count_tokens, with_kwargs=True)
    if ctx.peft_config is not None or not framework.plugins:
        ctx.report.add("trainer", f"PEFT {type(trainer.model).__name__} (LoRA by TRL)"
                       if ctx.peft_config is not None else "no plugins: plain transformers model", 1)
    log("patch report:")
    for line in ctx.report.lines():
        log(line)
    if is_main_process() and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()
    phases.mark("trainer")

    checkpoint = None
    if resume:
        checkpoint = get_last_checkpoint(sft_config.output_dir) if Path(sft_config.output_dir).exists() else None
        log(f"resuming from {checkpoint}" if checkpoint else "--resume: no checkpoint found, starting fresh")
    # A full collection walks every tracked object, and the model, tokenised data and trainer alive now made it a
    # 1-3.5 s pause inside a training step (llama3-8b, s15c1); frozen, they are no longer walked
    gc.collect()
    gc.freeze()
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    interrupted = metrics.stop_requested
    phases.mark("train")

    result = _result(cfg, args, framework, ctx, metrics, train_result)
    if interrupted:
        log("stopped on SIGTERM after saving a checkpoint; continue with --resume")
        return 143
    distributed.save_model(trainer, sft_config.output_dir)  # trainer.save_model, plus an FSDP checkpointing fix
    if is_main_process():
        tokenizer.save_pretrained(sft_config.output_dir)
        phases.mark("save")
        result["phase_seconds"] = phases.seconds
        log("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.seconds.items()))
        out = Path(sft_config.output_dir) / "metrics.json"
        out.write_text(json.dumps(result, indent=2, default=str))
        losses = result["losses"] or [float("nan")]
        log(f"tokens/s (per device, non-padding, after {metrics.warmup_steps} warm-up steps): "
            f"{result['train_tokens_per_second']:.1f}; peak memory "
            f"{result['mem_peak_torch_mem_alloc_in_bytes'] / 2**30:.2f} GiB; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        log(f"saved {'adapter' if hasattr(trainer.model, 'peft_config') else 'model'}, tokenizer and {out}")
    return 0


def _result(cfg, args, framework, ctx, metrics: RunMetrics, train_result) -> dict[str, Any]:
    """What ``metrics.json`` records (the seed's column names where they exist)."""
    _, seconds, tokens = metrics.throughput()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every rank's tokens and the mean loss over ranks (one collective each, after training)
    losses, total_tokens, measured_time = distributed.reduce_metrics(metrics.step_losses, tokens, seconds)
    total_tokens_per_second = total_tokens / measured_time if measured_time > 0 else 0.0
    tokens_per_second = total_tokens_per_second / world  # all ranks' tokens, per device
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "recipe": cfg.get("recipe"),
        "plugins": [p.name for p in framework.plugins],
        "train_tokens_per_second": tokens_per_second,
        "train_tokens_per_second_total": total_tokens_per_second,
        "measured_tokens": int(total_tokens),
        "measured_seconds": measured_time,
        "step_seconds": metrics.step_seconds(),  # this rank's (rank 0's in metrics.json)
        "train_tokens_per_second_median_step": metrics.median_step_throughput(),  # this rank's
        "step_times": metrics.step_times,  # every step's wall time on this rank, warm-up included
        "gc_seconds": metrics.gc_seconds,  # of which the garbage collector's pauses
        "gc_frozen_objects": gc.get_freeze_count(),  # set aside before training: collections do not walk them
        "train_runtime": train_result.metrics.get("train_runtime"),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "train_steps_per_second": train_result.metrics.get("train_steps_per_second"),
        "train_loss": train_result.metrics.get("train_loss", train_result.training_loss),
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "mem_peak_torch_mem_alloc_in_bytes": peak,
        "mem_torch_mem_alloc_in_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
        "mem_nvidia_mem_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        "num_gpus": world if torch.cuda.is_available() else 0,
        "world_size": world,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions(),
        "host_cpu": host_cpu(),
        "patch_report": ctx.report.as_dict(),
        "interrupted": metrics.stop_requested,
        "args": args,
    }


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


if __name__ == "__main__":
    exit_process(main())
