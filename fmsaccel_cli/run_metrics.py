"""What a training run measures and prints: tokens/s, peak memory, per-step losses and times, progress lines.

:class:`RunMetrics` is the trainer callback behind ``metrics.json`` and the bench's figures;
:class:`Phases` times a run's phases besides training; the profile and guard summaries are
the diagnostics of ``FMSACCEL_PROFILE=1``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import PROGRESS_TAG, gpu_idle, memory


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(f"[fmsaccel] {message}", flush=True)


class Phases:
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


def guard_summary(model) -> str:
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


def profile_summary(events) -> str:
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
    (scheduler, zero_grad, this callback's progress line) and
    ``between_steps`` (the trainer's logging, which gathers the loss over ranks, and the next
    batch). On launch-bound steps it shows where a multi-GPU step waits that a 1-GPU one does not.

    ``step_times``: each step's host wall time, warm-up steps included, with the seconds the Python
    garbage collector paused it (``gc_seconds``): one slow step in a short benchmark (a compile for a
    new shape, a full collection) moves its tokens/s, and these show which step and why. On a GPU
    the median step is timed between CUDA events recorded at each step's end (no sync): where
    nothing syncs at step boundaries (``logging_steps`` > 1) host times say when a step was
    queued, not when it ran.

    Progress lines (every ``progress_steps``, default ``logging_steps``) never make the host wait
    for the GPU: a step's loss and token count are copied to host memory behind its work, and the
    line is printed at the next step's end (or when training ends), once that copy has landed.
    """

    STEP_PHASES = ("forward_backward", "optimizer", "step_end", "between_steps")

    def __init__(self, warmup_steps: int, progress_steps: int | None = None):
        self.warmup_steps = warmup_steps
        self.progress_steps = progress_steps  # None: logging_steps
        self._progress_queued: tuple | None = None  # (step, max_steps, host copy, CUDA event or None, host time)
        self.warmup_event = None  # CUDA event at the end of the warm-up (GPU runs)
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
        self.step_end_events: list = []  # CUDA events recorded at each step's end (GPU runs)
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
        """Forward pre-hook: add the batch's real tokens to the step's count.

        A collator's filler (``num_padding_tokens``, from padding-free length buckets) is not
        counted, and the key is taken out of the model's arguments.
        """
        filler = kwargs.pop("num_padding_tokens", 0)
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return args, kwargs
        n = mask.sum() if mask is not None else torch.tensor(ids.numel() - int(filler), device=ids.device)
        self.tokens = n if self.tokens is None else self.tokens + n
        return args, kwargs

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
        self._print_progress()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _mark_warmup_end(self) -> None:
        self._sync()
        self.time_at_warmup = time.perf_counter()
        if torch.cuda.is_available():
            self.warmup_event = torch.cuda.Event(enable_timing=True)
            self.warmup_event.record()
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
                                                               torch.profiler.ProfilerActivity.CUDA],
                                                   # the Python call sites of host syncs (gpu_idle), at a cost
                                                   with_stack=os.environ["FMSACCEL_PROFILE"] == "stack")
            self.profiler.__enter__()

    def _write_profile(self, output_dir: str, model=None) -> None:
        self._sync()
        self.profiler.__exit__(None, None, None)
        table = profile_summary(self.profiler.key_averages())
        if torch.cuda.is_available():
            try:
                table += "\n" + gpu_idle.gpu_idle_summary(self.profiler.events())
            except Exception as e:  # noqa: BLE001 - a diagnostic must not fail the run
                table += f"\nGPU idle: unavailable ({type(e).__name__}: {e})"
        guards = guard_summary(model) if model is not None else ""
        if guards:
            table += "\n" + guards
        if is_main_process():
            Path(output_dir, "profile.txt").write_text(table)
            print(table, flush=True)
        self.profiler = None
        # the profile's millions of event objects, collected now (a warm-up step) rather than by a full collection
        # inside a measured step (0.9 s in s15c2's baseline)
        gc.collect()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.step_marks["pre_optimizer"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step_marks["optimizer"] = time.perf_counter()

    def _time_step(self, measured: bool) -> None:
        """Close the step's phases (called last in ``on_step_end``, after this callback's own work)."""
        marks = self.step_marks
        marks["step_end"] = time.perf_counter()
        if torch.cuda.is_available():
            self.step_end_events.append(torch.cuda.Event(enable_timing=True))
            self.step_end_events[-1].record()
        if "begin" in marks:
            self.step_times.append(round(marks["step_end"] - marks["begin"], 4))
            self.gc_seconds.append(round(self._gc_pause, 4))
            self.step_token_totals.append(self.tokens)  # count_tokens replaces it, never adds in place
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
        self._print_progress()  # the last queued line: its copy has landed, or lands behind work already queued
        every = self.progress_steps or max(int(args.logging_steps), 1)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            self._queue_progress(state.global_step, state.max_steps)
        self._time_step(measured=done > self.warmup_steps)

    def _queue_progress(self, step: int, max_steps: int) -> None:
        """Copy this step's loss and token count to host memory behind the step's work (no wait)."""
        loss = self.step_losses[-1] if self.step_losses else None
        device = next((t.device for t in (loss, self.tokens) if t is not None), None)
        values = torch.stack([torch.as_tensor(float("nan") if t is None else t.detach(), dtype=torch.float64,
                                              device=device).reshape(()) for t in (loss, self.tokens)])
        event = None
        if values.is_cuda:
            host = torch.empty(2, dtype=torch.float64, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            values = host
        self._progress_queued = (step, max_steps, values, event, time.perf_counter())

    def _print_progress(self) -> None:
        """Print the queued progress line: tokens/s since the warm-up (GPU time between CUDA events) and loss."""
        if self._progress_queued is None:
            return
        step, max_steps, values, event, queued_at = self._progress_queued
        self._progress_queued = None
        if event is not None:
            event.synchronize()  # this step's end only, not the work queued after it
        loss, tokens = values.tolist()
        rate = 0.0
        if self.time_at_warmup is not None and tokens == tokens and step - self.first_step > self.warmup_steps:
            seconds = (self.warmup_event.elapsed_time(event) / 1000 if event is not None and self.warmup_event
                       else queued_at - self.time_at_warmup)
            rate = (tokens - self.tokens_at_warmup) / seconds if seconds > 0 else 0.0
        if is_main_process():
            print(f"{PROGRESS_TAG} " + json.dumps({"step": step, "max_steps": max_steps, "tokens_per_second": rate,
                                                   "loss": loss}), flush=True)

    def median_step_throughput(self) -> float | None:
        """Tokens/s of the median measured step (this rank): robust to one slow step, which the mean over a
        short run is not (a padded baseline planning cuDNN attention for a new length, a compile)."""
        first = self.warmup_steps
        if len(self.step_token_totals) <= first or any(t is None for t in self.step_token_totals):
            return None
        totals = torch.stack([t.float() for t in self.step_token_totals]).tolist()  # one sync, after training
        seconds = list(self.step_times)
        events = self.step_end_events
        if len(events) == len(seconds):  # the GPU's own spacing of step ends, from the second step on
            seconds[1:] = [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:], strict=False)]
        rates = [(totals[i] - (totals[i - 1] if i else 0.0)) / seconds[i]
                 for i in range(first, len(totals)) if seconds[i] > 0]
        return statistics.median(rates) if rates else None

    def throughput(self) -> tuple[float, float, int]:
        if self.time_at_warmup is None or self.tokens is None:
            return 0.0, 0.0, 0
        self._sync()
        elapsed = time.perf_counter() - self.time_at_warmup
        tokens = float(self.tokens) - self.tokens_at_warmup
        return (tokens / elapsed if elapsed > 0 else 0.0), elapsed, int(tokens)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "cuda": torch.version.cuda or "none"}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton", "fmsaccel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def host_cpu() -> str:
    """The host's CPU model and core count: launch-bound workloads (R) move with it, so it goes with each figure."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
