"""The training entry point, run by torchrun: ``python -m fmsaccel_cli.train CONFIG.yaml [--resume]``.

tokenizer → model (a loader plugin or ``from_pretrained``) → plugins augment it →
TRL ``SFTTrainer`` → train → adapter/model, tokenizer and ``metrics.json``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from fmsaccel_framework.plugin import AccelerationFramework, PluginError, TrainContext

from . import data, distributed, memory, models, recipes

PROGRESS_TAG = "FMSACCEL_PROGRESS"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": torch.bfloat16}
# fms-hf-tuning names -> SFTConfig names
RENAMED = {"evaluation_strategy": "eval_strategy", "max_seq_length": "max_length"}
NOT_SFT = set(recipes.EXTRA_ARGUMENTS) | {"r", "lora_alpha", "lora_dropout", "target_modules", "bias"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(f"[fmsaccel] {message}", flush=True)


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


class _Phases:
    """Wall-clock seconds of each phase of a run, in order.

    ``startup`` is the time from ``fmsaccel run`` starting torchrun (``FMSACCEL_LAUNCHED_AT``)
    to this process reaching its first phase: torchrun, interpreter start, importing torch,
    transformers and TRL, CUDA initialisation.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        launched = os.environ.get("FMSACCEL_LAUNCHED_AT")
        if launched:
            self.seconds["startup"] = round(max(0.0, time.time() - float(launched)), 2)
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def _guard_summary(model) -> str:
    """Dynamo's guards on the model's compiled regions (foak's ``compile_layers``), checked before every call.

    One line per cache entry: how many guards, by kind, and how many Python evaluates
    (``LAMBDA_GUARD``, the slow ones), which are listed. Empty when nothing is compiled.
    """
    import collections
    import re

    codes = {type(m).forward.__code__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    if not codes:
        return ""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # a private API: a diagnostic only
    except ImportError as e:
        return f"guards: unavailable ({type(e).__name__})\n"
    lines = []
    for code in sorted(codes, key=lambda c: c.co_qualname):
        try:
            entries = _debug_get_cache_entry_list(code)
        except (AttributeError, RuntimeError) as e:
            return f"guards: unavailable ({type(e).__name__})\n"
        for i, entry in enumerate(entries):
            text = str(entry.guard_manager)
            kinds = collections.Counter(re.findall(r"\+- ([A-Z_]+):", text))
            python = [line.split("LAMBDA_GUARD:", 1)[1].split("#")[0].strip() for line in text.splitlines()
                      if "LAMBDA_GUARD:" in line]
            lines.append(f"guards of {code.co_qualname} (cache entry {i}): {sum(kinds.values())}; "
                         + ", ".join(f"{k} {n}" for k, n in kinds.most_common(6)))
            lines += [f"  python guard: {g[:150]}" for g in python]
    return "".join(f"{line}\n" for line in lines)


def _profile_summary(events) -> str:
    """Top kernels by GPU time, top ops by CPU time, and the launch count (R-like steps are launch-bound)."""
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    gpu_busy = sum(e.self_device_time_total for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    cpu_total = sum(e.self_cpu_time_total for e in events) / 1e3
    parts = [f"two steps: {launches} kernel launches, {gpu_busy:.1f} ms GPU busy, {cpu_total:.1f} ms CPU (self)"]
    if torch.cuda.is_available():
        parts.append(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    parts.append(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return "\n".join(parts)


class RunMetrics(TrainerCallback):
    """Tokens/s on non-padding tokens after warm-up, peak memory, per-step loss, progress lines.

    Tokens are counted in a forward pre-hook on the top-level model (gradient
    checkpointing recomputes layers, never the top-level forward), as a device
    tensor so counting adds no host sync.

    ``step_seconds``: where each measured step's wall time goes, from host timestamps at the
    trainer's callbacks (no sync added): ``forward_backward`` (step start to the optimizer, with
    gradient clipping and the trainer's per-micro-batch metrics), ``optimizer``, ``step_end``
    (scheduler, zero_grad, this callback's progress line, which waits for the GPU) and
    ``between_steps`` (the trainer's logging, which gathers the loss over ranks, and the next
    batch). On launch-bound steps it shows where a multi-GPU step waits that a 1-GPU one does not.

    ``step_times``: each step's host wall time, warm-up steps included, with the seconds the Python
    garbage collector paused it (``gc_seconds``): one slow step in a short benchmark (a compile for a
    new shape, a full collection) moves its tokens/s, and these show which step and why.
    """

    STEP_PHASES = ("forward_backward", "optimizer", "step_end", "between_steps")

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.tokens = None
        self.tokens_at_warmup = None
        self.time_at_warmup = None
        self.step_losses: list[torch.Tensor] = []  # one per optimiser step
        self.micro_loss: torch.Tensor | None = None  # this step's micro-batches so far
        self.stop_requested = False
        self.memory_baseline: int | None = None  # FMSACCEL_MEMORY: bytes allocated when recording began
        self.step_marks: dict[str, float] = {}  # host timestamps of the current step's callbacks
        self.step_phase_totals = dict.fromkeys(self.STEP_PHASES, 0.0)
        self.timed_steps = 0
        self.step_times: list[float] = []
        self.step_token_totals: list[torch.Tensor | None] = []  # the running token count at each step's end
        self.gc_seconds: list[float] = []  # per step, beside step_times
        self._gc_pause = 0.0
        self._gc_started: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_pause += time.perf_counter() - self._gc_started
            self._gc_started = None

    def count_tokens(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        n = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        self.tokens = n if self.tokens is None else self.tokens + n

    def record_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, already divided by the accumulation steps: they add up to the step's loss."""
        loss = loss.detach().float().reshape(())
        self.micro_loss = loss if self.micro_loss is None else self.micro_loss + loss

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.first_step = state.global_step
        steps = state.max_steps - state.global_step
        if self.warmup_steps >= steps:
            log(f"benchmark_warmup_steps {self.warmup_steps} leaves no step to measure in {steps}; using "
                f"{max(steps - 1, 0)}")
            self.warmup_steps = max(steps - 1, 0)
        if self.warmup_steps == 0:
            self._mark_warmup_end()
        # FMSACCEL_MEMORY=1: record allocations through the warm-up steps, report what is alive at their peak
        if os.environ.get("FMSACCEL_MEMORY") and torch.cuda.is_available() and self.warmup_steps > 0:
            self.memory_baseline = memory.start_recording()

    def on_train_end(self, args, state, control, **kwargs):
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _mark_warmup_end(self) -> None:
        self._sync()
        self.time_at_warmup = time.perf_counter()
        self.tokens_at_warmup = float(self.tokens) if self.tokens is not None else 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.time_at_warmup is not None and "step_end" in self.step_marks:
            self.step_phase_totals["between_steps"] += now - self.step_marks["step_end"]
        self.step_marks = {"begin": now}
        self._gc_pause = 0.0
        # FMSACCEL_PROFILE=1: profile the last two warm-up steps (never the measured ones)
        if os.environ.get("FMSACCEL_PROFILE") and state.global_step - self.first_step == self.warmup_steps - 2:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def _write_profile(self, output_dir: str, model=None) -> None:
        self._sync()
        self.profiler.__exit__(None, None, None)
        table = _profile_summary(self.profiler.key_averages())
        guards = _guard_summary(model) if model is not None else ""
        if guards:
            table += "\n" + guards
        if is_main_process():
            Path(output_dir, "profile.txt").write_text(table)
            print(table, flush=True)
        self.profiler = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.step_marks["pre_optimizer"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step_marks["optimizer"] = time.perf_counter()

    def _time_step(self, measured: bool) -> None:
        """Close the step's phases (called last in ``on_step_end``, after this callback's own work)."""
        marks = self.step_marks
        marks["step_end"] = time.perf_counter()
        if "begin" in marks:
            self.step_times.append(round(marks["step_end"] - marks["begin"], 4))
            self.gc_seconds.append(round(self._gc_pause, 4))
            self.step_token_totals.append(None if self.tokens is None else self.tokens.detach().clone())
        if measured and {"begin", "pre_optimizer", "optimizer"} <= marks.keys():
            self.step_phase_totals["forward_backward"] += marks["pre_optimizer"] - marks["begin"]
            self.step_phase_totals["optimizer"] += marks["optimizer"] - marks["pre_optimizer"]
            self.step_phase_totals["step_end"] += marks["step_end"] - marks["optimizer"]
            self.timed_steps += 1

    def step_seconds(self) -> dict[str, float]:
        """Mean seconds per measured step in each phase (``between_steps`` counts the gaps after them)."""
        n = max(self.timed_steps, 1)
        return {k: round(v / n, 4) for k, v in self.step_phase_totals.items()}

    def on_step_end(self, args, state, control, **kwargs):
        if self.micro_loss is not None:
            self.step_losses.append(self.micro_loss)
            self.micro_loss = None
        done = state.global_step - self.first_step
        if getattr(self, "profiler", None) is not None and done == self.warmup_steps:
            self._write_profile(args.output_dir, kwargs.get("model"))
        if done == self.warmup_steps and self.memory_baseline is not None:
            report = memory.stop_and_report(self.memory_baseline)
            if is_main_process():
                Path(args.output_dir, "memory_peak.txt").write_text(report + "\n")
                print(report, flush=True)
        if done == self.warmup_steps and self.warmup_steps > 0:
            self._mark_warmup_end()
        if self.stop_requested:
            log("SIGTERM received: saving a checkpoint and stopping")
            control.should_save = True
            control.should_training_stop = True
        if state.global_step % max(args.logging_steps, 1) == 0 or state.global_step == state.max_steps:
            loss = float(self.step_losses[-1]) if self.step_losses else float("nan")
            if is_main_process():
                print(f"{PROGRESS_TAG} " + json.dumps({"step": state.global_step, "max_steps": state.max_steps,
                                                       "tokens_per_second": self.throughput()[0], "loss": loss}),
                      flush=True)
        self._time_step(measured=done > self.warmup_steps)

    def median_step_throughput(self) -> float | None:
        """Tokens/s of the median measured step (this rank): robust to one slow step, which the mean over a
        short run is not (a padded baseline planning cuDNN attention for a new length, a compile)."""
        first = self.warmup_steps
        if len(self.step_token_totals) <= first or any(t is None for t in self.step_token_totals):
            return None
        totals = [float(t) for t in self.step_token_totals]  # one sync per step, after training
        rates = sorted((totals[i] - (totals[i - 1] if i else 0.0)) / self.step_times[i]
                       for i in range(first, len(totals)) if self.step_times[i] > 0)
        if not rates:
            return None
        mid = len(rates) // 2
        return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2

    def throughput(self) -> tuple[float, float, int]:
        if self.time_at_warmup is None or self.tokens is None:
            return 0.0, 0.0, 0
        self._sync()
        elapsed = time.perf_counter() - self.time_at_warmup
        tokens = float(self.tokens) - self.tokens_at_warmup
        return (tokens / elapsed if elapsed > 0 else 0.0), elapsed, int(tokens)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "cuda": torch.version.cuda or "none"}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton", "fmsaccel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _host_cpu() -> str:
    """The host's CPU model and core count: launch-bound workloads (R) move with it, so it goes with each figure."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


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

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(cfg: dict[str, Any], args: dict[str, Any], resume: bool) -> int:
    phases = _Phases()  # where a run's wall time goes besides training (benchmark cells pay it every time)
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
    _name_experts_for_trl(model)
    _record_router_logits(model)
    phases.mark("data_and_model")

    metrics = RunMetrics(int(args.get("benchmark_warmup_steps", 2)))
    signal.signal(signal.SIGTERM, lambda *_: setattr(metrics, "stop_requested", True))

    class Trainer(SFTTrainer):
        def compute_loss(self, *a, **kw):
            with distributed.rank_local_metrics(self, args):
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
        "versions": _versions(),
        "host_cpu": _host_cpu(),
        "patch_report": ctx.report.as_dict(),
        "interrupted": metrics.stop_requested,
        "args": args,
    }


def _name_experts_for_trl(model) -> None:
    """TRL's SFTTrainer turns the load-balancing loss on for MoE models, and its loss forward reads
    ``config.num_experts``, which Mixtral and Granite MoE configs call ``num_local_experts``: alias it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(config, "num_experts") and hasattr(config, "num_local_experts"):
        config.num_experts = config.num_local_experts


def _record_router_logits(model) -> None:
    """Make an MoE model that does not record its router logits record them (Granite MoE in transformers 5.17).

    Without them its load-balancing loss is the int 0: TRL's logging of it crashes, and the loss the run asked for
    is silently missing. The router (a ``*TopKRouter``) is probed once to find which output holds the logits.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:  # another transformers: its models record what they declare
        return
    router = next((m for m in model.modules() if type(m).__name__.endswith("TopKRouter")), None)
    lacking = [m for m in model.modules()  # the model classes around the router that declare no router logits
               if isinstance(getattr(type(m), "_can_record_outputs", None), dict)
               and "router_logits" not in type(m)._can_record_outputs
               and any(sub is router for sub in m.modules())] if router is not None else []
    if not lacking:
        return
    weight = router.weight
    with torch.no_grad():
        outputs = router(torch.zeros(1, weight.shape[-1], dtype=weight.dtype, device=weight.device))
    index = next((i for i, t in enumerate(outputs) if torch.is_tensor(t) and t.is_floating_point()
                  and t.shape[-1] == weight.shape[0]), None)  # [tokens, num_experts]: the logits
    if index is None:
        log(f"warning: {type(router).__name__} returns no [tokens, experts] logits: the load-balancing loss "
            "cannot be computed for this model")
        return
    recorder = {"router_logits": OutputRecorder(type(router), index=index)}
    for module in lacking:
        declared = type(module)._can_record_outputs
        if type(_CAN_RECORD_REGISTRY) is dict:  # 5.17: keyed on the class name
            key = str(type(module))
            _CAN_RECORD_REGISTRY[key] = {**(_CAN_RECORD_REGISTRY.get(key) or declared), **recorder}
        else:  # later releases key it on the model
            _CAN_RECORD_REGISTRY[module] = {**(_CAN_RECORD_REGISTRY.get(module) or declared), **recorder}
    log(f"{' and '.join(type(m).__name__ for m in lacking)} did not record router logits: now recording output "
        f"{index} of {type(router).__name__} (for the load-balancing loss)")


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


if __name__ == "__main__":
    sys.exit(main())
