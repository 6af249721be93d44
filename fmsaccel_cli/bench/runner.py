"""Run benchmark cells, each as its own ``fmsaccel run`` process, and record one row per cell as it ends.

A failed cell (out of memory, timeout, crash) is a row too, with its error kind and the last lines of its output,
and the matrix goes on. After every cell the whole results set is rewritten atomically (temp file + rename) as
``results.jsonl`` (raw rows, nested fields kept) and ``results.csv`` (the seed's column names), so killing the bench
loses nothing finished and never leaves a torn file; ``--resume`` skips the cells already recorded.

Each cell's process gets its own process group, so a timeout or Ctrl-C ends torchrun and all its workers; on Linux
it is also told to terminate if the bench itself dies (even from SIGKILL), so no orphan keeps holding a GPU.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import PROGRESS_TAG
from ..files import atomic_write
from .matrix import NO_PLUGIN, BenchError, Cell

RUN_CMD_ENV = "FMSACCEL_BENCH_RUN_CMD"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
CELLS_DIR = "cells"
TAIL_LINES = 30
KILL_GRACE_S = 15.0
# A run whose metrics.json (its last write) exists is done: if it has not exited this long after, its process group
# is stopped. Teardown takes about 5 s on an H100 host (exit_s), but one cell there once outlived its --timeout after
# writing its results: a stuck exit must not hold the matrix.
EXIT_GRACE_S = 10.0
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory")

# Leading CSV columns, in the seed's reference-CSV names; anything else follows alphabetically.
CSV_COLUMNS = [
    "scenario", "framework_config", "recipe", "peft_method", "model_name_or_path", "training_data_path",
    "num_gpus", "effective_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
    "r", "lora_alpha", "lora_dropout", "target_modules", "torch_dtype", "learning_rate", "max_steps", "status", "error",
    "train_loss", "final_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
    "train_tokens_per_second", "train_tokens_per_second_total", "train_tokens_per_second_vs_baseline",
    "mem_peak_torch_mem_alloc_in_bytes", "mem_peak_torch_mem_alloc_in_bytes_vs_baseline",
    "mem_torch_mem_alloc_in_bytes", "mem_nvidia_mem_reserved", "gpu_device_name",
]
# metrics.json keys not copied into the row: the cell's own coordinates win (a CPU run reports num_gpus 0)
METRICS_NOT_COPIED = ("num_gpus", "recipe", "args")
CSV_OMITTED = ("losses", "patch_report", "args", "command")  # kept in the JSONL only


def default_run_prefix() -> list[str]:
    """How to start ``fmsaccel run``: ``$FMSACCEL_BENCH_RUN_CMD`` (tests point it at a fake), else the installed
    ``fmsaccel`` script beside this Python, else the CLI module through this Python."""
    if os.environ.get(RUN_CMD_ENV):
        return shlex.split(os.environ[RUN_CMD_ENV])
    script = Path(sys.executable).with_name("fmsaccel")
    if script.exists():
        return [str(script), "run"]
    if shutil.which("fmsaccel"):
        return [shutil.which("fmsaccel"), "run"]
    return [sys.executable, "-c", "from fmsaccel_cli.main import app; app()", "run"]


# ---------------------------------------------------------------------------------------------- one cell


@dataclass
class CellOutcome:
    status: str  # ok | oom | timeout | crash
    returncode: int | None
    elapsed_s: float
    tail: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    exit_s: float | None = None  # seconds from the results being written to the cell ending (teardown)


ERROR_LINE = re.compile(r"^\s*(?:\[[^\]]*\]:?\s*)?([\w.]*(?:Error|Exception)\b.*)$")
NOISE = ("ChildFailedError",)  # torchrun's wrapper around the worker's real error


def error_summary(lines: list[str]) -> str:
    """The line that says what went wrong: an OOM, else the last ``SomethingError: ...`` that is not torchrun's
    wrapper, else the last non-empty line."""
    for line in reversed(lines):
        if any(marker in line for marker in OOM_MARKERS):
            return line.strip()
    for line in reversed(lines):
        match = ERROR_LINE.match(line)
        if match and not any(noise in line for noise in NOISE):
            return match.group(1).strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def _classify(returncode: int | None, timed_out: bool, saw_oom: bool, has_metrics: bool) -> str:
    # metrics.json is the run's last write (after the adapter): a cell stopped later only failed to exit
    if timed_out:
        return "ok" if has_metrics else "timeout"
    if saw_oom:
        return "oom"
    return "ok" if returncode == 0 and has_metrics else "crash"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the bench dies (torchrun forwards it to workers)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the cell's process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _has_results(metrics_path: Path) -> bool:
    """Whether the run has written complete results (a half-written file is not yet)."""
    try:
        return json.loads(metrics_path.read_text()).get("train_tokens_per_second") is not None
    except (OSError, ValueError, AttributeError):
        return False


def run_cell(
    command: list[str],
    cell_dir: Path,
    timeout_s: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    exit_grace_s: float = EXIT_GRACE_S,
    env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> CellOutcome:
    """Run one cell, teeing its output to ``cell_dir/output.log``; classify how it ended.

    Once the run has written its results, it gets ``exit_grace_s`` to exit before its process group is stopped.
    ``env`` adds to the cell's environment (its GPUs); ``stop`` set from another thread ends the cell unrecorded,
    as Ctrl-C does.
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "command.sh").write_text(shlex.join(command) + "\n")
    metrics_path = cell_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # a stale file from an interrupted attempt must not count as success
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    saw_oom = timed_out = stopped_after_results = False
    results_at: float | None = None  # when complete results were first seen
    next_results_check = 0.0
    first_error = ""  # the first error line, which torchrun's long epilogue pushes out of the tail
    start = time.monotonic()
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        errors="replace", bufsize=1, process_group=0, preexec_fn=_die_with_parent if linux else None,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        with open(cell_dir / "output.log", "w") as log:
            while True:
                if stop is not None and stop.is_set():
                    raise BenchInterrupted("the bench is stopping")
                now = time.monotonic()
                if now >= next_results_check:  # a stat twice a second, however fast the output comes
                    next_results_check = now + 0.5
                    if results_at is None and _has_results(metrics_path):
                        results_at = now
                    elif results_at is not None and now - results_at > exit_grace_s:
                        stopped_after_results = True
                        log.write(f"\n[fmsaccel bench] stopping the cell: it wrote its results {exit_grace_s:g} s ago"
                                  " and has not exited\n")
                        _stop_group(proc, kill_grace_s)
                        break
                if now - start > timeout_s:
                    timed_out = True
                    log.write(f"\n[fmsaccel bench] timeout after {timeout_s:g} s: stopping the cell\n")
                    tail.append(f"[fmsaccel bench] timeout after {timeout_s:g} s")
                    _stop_group(proc, kill_grace_s)
                    break
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                tag = text.find(PROGRESS_TAG)  # a tqdm bar may share the line: "\r 33%|###| 1/3FMSACCEL_PROGRESS {..}"
                if tag >= 0:
                    if on_progress is not None:
                        try:
                            on_progress(json.loads(text[tag + len(PROGRESS_TAG) :]))
                        except json.JSONDecodeError:
                            pass
                    continue
                tail.append(text)
                if any(marker in text for marker in OOM_MARKERS):
                    saw_oom = True
                    first_error = first_error or text
                elif ERROR_LINE.match(text) and not any(noise in text for noise in NOISE):
                    first_error = first_error or text
    except BaseException:
        _stop_group(proc, kill_grace_s)  # Ctrl-C / SIGTERM of the bench: end the cell, record nothing
        raise
    returncode = proc.wait()
    ended = time.monotonic()
    reader.join(timeout=5)
    metrics: dict[str, Any] = {}
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as e:
            tail.append(f"[fmsaccel bench] unreadable metrics.json: {e}")
    elif returncode == 0 and not timed_out:
        tail.append(f"[fmsaccel bench] the run exited 0 but wrote no {metrics_path}")
    complete = metrics.get("train_tokens_per_second") is not None
    status = _classify(returncode, timed_out or stopped_after_results, saw_oom, complete)
    if complete and (timed_out or stopped_after_results):
        why = "at the timeout" if timed_out else f"{exit_grace_s:g} s after"
        tail.append(f"[fmsaccel bench] the run had written its results (metrics.json, after the adapter) but had not "
                    f"exited {why}: stopped")
    lines = list(tail)
    if first_error and first_error not in lines:
        lines = [first_error, "..."] + lines
    exit_s = round(ended - results_at, 2) if results_at is not None else None
    stopped = timed_out or stopped_after_results
    return CellOutcome(status, None if stopped else returncode, ended - start, lines, metrics, exit_s)


# ---------------------------------------------------------------------------------------------- rows


def cell_row(cell: Cell, outcome: CellOutcome, cell_dir: Path, command: list[str]) -> dict[str, Any]:
    """One results row: the cell's coordinates and arguments, then (resolved args and) metrics when it ran."""
    row: dict[str, Any] = {
        "cell_id": cell.cell_id,
        "scenario": cell.scenario,
        "framework_config": cell.framework_config or NO_PLUGIN,
        "recipe": cell.recipe,
        "num_gpus": cell.num_gpus,
        "effective_batch_size": cell.effective_batch_size,
    }
    resolved = outcome.metrics.get("args")
    if isinstance(resolved, dict):  # what the run resolved (recipe arguments too); what the cell asked for wins
        row.update({k: v for k, v in resolved.items() if k != "output_dir"})
    row.update(cell.arguments)
    for key, value in outcome.metrics.items():
        if key == "gpu":
            row["gpu_device_name"] = value
        elif key == "versions" and isinstance(value, dict):
            row.update({f"version_{name}": version for name, version in value.items()})
        elif key not in METRICS_NOT_COPIED:
            row[key] = value
    row.update({
        "status": outcome.status,
        "returncode": outcome.returncode,
        "elapsed_s": round(outcome.elapsed_s, 2),
        "exit_s": outcome.exit_s,
        "error": _error_column(outcome),
        "error_messages": "" if outcome.status == "ok" else "\n".join(outcome.tail),
        "cell_dir": str(cell_dir),
        "command": command,
    })
    return row


def _error_column(outcome: CellOutcome) -> str:
    if outcome.status != "ok":
        return error_summary(outcome.tail)
    return outcome.tail[-1] if outcome.returncode is None and outcome.tail else ""  # ok, but stopped after its results


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)  # the seed writes target_modules space-separated
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def write_results(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite results.jsonl and results.csv (with the ratios to the baseline) atomically."""
    from .report import add_baseline_ratios

    rows = add_baseline_ratios(rows)
    atomic_write(out_dir / RESULTS_JSONL, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    keys = {k for r in rows for k in r if k not in CSV_OMITTED}
    columns = [c for c in CSV_COLUMNS if c in keys] + sorted(keys - set(CSV_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r.get(k)) for k in columns})
    atomic_write(out_dir / RESULTS_CSV, buf.getvalue())


def read_recorded(out_dir: Path) -> list[dict[str, Any]]:
    """Rows already in ``results.jsonl`` (the file is only ever replaced whole, so every line is complete)."""
    path = out_dir / RESULTS_JSONL
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: not a results file (line {e.lineno}: {e.msg})") from None


# ---------------------------------------------------------------------------------------------- the matrix


class BenchInterrupted(KeyboardInterrupt):
    """SIGTERM to the bench: handled like Ctrl-C (the running cell is stopped and not recorded)."""


def _raise_interrupted(signum, frame):
    raise BenchInterrupted(f"signal {signum}")


@dataclass
class BenchSummary:
    ran: int
    skipped: int
    statuses: dict[str, int]
    out_dir: Path


def run_matrix(
    cells: list[Cell],
    out_dir: str | Path,
    timeout_s: float = 3600.0,
    resume: bool = False,
    retry_failed: bool = False,
    run_prefix: list[str] | None = None,
    console=None,
    show_progress: bool = True,
    devices: list[str] | None = None,
) -> BenchSummary:
    """Run every cell not yet recorded; rows are written as each cell ends.

    With ``devices`` (GPU ids) cells run side by side, each given its ``num_gpus`` of them through
    ``CUDA_VISIBLE_DEVICES``, starting in matrix order as GPUs free up; without, one at a time on what is visible.
    """
    from rich.console import Console

    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_recorded(out_dir)
    resume = resume or retry_failed
    if rows and not resume:
        raise BenchError(f"{out_dir / RESULTS_JSONL} already has {len(rows)} rows; pass --resume to continue it "
                         "or choose another --out")
    # with --retry-failed a failed row stays recorded until its cell's new result replaces it
    done = {r.get("cell_id") for r in rows if not retry_failed or r.get("status") == "ok"}
    todo = [c for c in cells if c.cell_id not in done]
    skipped = len(cells) - len(todo)
    if devices:
        too_big = [c for c in todo if c.num_gpus > len(devices)]
        if too_big:
            raise BenchError(f"cell {too_big[0].cell_id.split('#')[0]} needs {too_big[0].num_gpus} GPUs; --devices "
                             f"gives {len(devices)} ({','.join(devices)})")
    if skipped:
        console.print(f"resume: {skipped} of {len(cells)} cells already recorded in {out_dir}", markup=False)
    prefix = run_prefix or default_run_prefix()
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()  # rows, the results files and the counters, when cells end side by side

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with _progress(console, show_progress) as progress:
            matrix_task = progress.add_task("matrix", total=len(todo), tps="")

            def run_one(i: int, cell: Cell, env: dict[str, str] | None = None,
                        stop: threading.Event | None = None) -> None:
                nonlocal rows
                cell_dir = out_dir / CELLS_DIR / cell.dir_name
                command = cell.command(prefix, cell_dir)
                where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env else ""
                label = f"[{i}/{len(todo)}] {cell.cell_id.split('#')[0]}{where}"
                step_task = progress.add_task(label, total=None, tps="")

                def on_progress(event: dict[str, Any]) -> None:
                    tps = event.get("tokens_per_second")
                    progress.update(step_task, completed=event.get("step", 0), total=event.get("max_steps"),
                                    tps=f"{tps:,.0f} tok/s" if tps else "")

                try:
                    outcome = run_cell(command, cell_dir, timeout_s, on_progress, env=env, stop=stop)
                finally:
                    progress.remove_task(step_task)
                row = cell_row(cell, outcome, cell_dir, command)
                with lock:
                    rows = [r for r in rows if r.get("cell_id") != cell.cell_id] + [row]
                    write_results(out_dir, rows)
                    statuses[outcome.status] += 1
                    progress.advance(matrix_task)
                    _print_outcome(console, label, outcome)

            if devices:
                _side_by_side(todo, devices, run_one)
            else:
                for i, cell in enumerate(todo, 1):
                    run_one(i, cell)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return BenchSummary(len(todo), skipped, dict(statuses), out_dir)


def _side_by_side(todo: list[Cell], devices: list[str], run_one: Callable) -> None:
    """Start cells in order as soon as enough of ``devices`` are free; on Ctrl-C / SIGTERM stop them all."""
    free = list(devices)
    running: dict[threading.Thread, list[str]] = {}
    stop = threading.Event()

    def work(i: int, cell: Cell, mine: list[str]) -> None:
        try:
            run_one(i, cell, {"CUDA_VISIBLE_DEVICES": ",".join(mine)}, stop)
        except BenchInterrupted:
            pass  # stopped with the bench: not recorded

    pending = collections.deque(enumerate(todo, 1))
    try:
        while pending or running:
            while pending and len(free) >= pending[0][1].num_gpus:
                i, cell = pending.popleft()
                mine, free[:] = free[: cell.num_gpus], free[cell.num_gpus :]
                thread = threading.Thread(target=work, args=(i, cell, mine), daemon=True)
                running[thread] = mine
                thread.start()
            time.sleep(0.2)  # the main thread stays free to receive Ctrl-C / SIGTERM
            for thread in [t for t in running if not t.is_alive()]:
                free.extend(running.pop(thread))
    except BaseException:
        stop.set()
        for thread in running:
            thread.join()
        raise


def _print_outcome(console, label: str, outcome: CellOutcome) -> None:
    from rich.markup import escape

    label = escape(label)
    if outcome.status == "ok":
        tps = outcome.metrics.get("train_tokens_per_second")
        extra = f"{tps:,.0f} tok/s/device" if isinstance(tps, int | float) else ""
        console.print(f"[green]ok[/green] {label} {extra} ({outcome.elapsed_s:.0f} s)")
    else:
        why = error_summary(outcome.tail)
        console.print(f"[red]{outcome.status}[/red] {label} ({outcome.elapsed_s:.0f} s): {escape(why[:200])}")


def _progress(console, enabled: bool):
    from rich import progress as rp

    return rp.Progress(
        rp.TextColumn("{task.description}", markup=False), rp.BarColumn(), rp.MofNCompleteColumn(),
        rp.TextColumn("{task.fields[tps]}"), rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn(),
        console=console, disable=not enabled,
    )
