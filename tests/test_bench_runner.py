"""The bench runner against a fake ``fmsaccel run``: failing cells, timeouts, kill-and-resume, result files.

The fake (written to a temp folder) behaves by model name: ``ok-*`` trains (progress lines + metrics.json),
``oom`` dies of CUDA OOM, ``crash`` exits 3, ``hang`` sleeps until killed, ``hang-once`` hangs only while
``FAKE_HANG`` is set, ``slow-exit`` hangs after writing its metrics, ``ok-sleep`` holds its GPUs 3 s after them.
Every start is appended to ``$FAKE_LOG`` (with its CUDA_VISIBLE_DEVICES) so a test can tell what ran, how often and
where.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from fmsaccel_cli.bench.matrix import Cell, expand, load_scenarios
from fmsaccel_cli.bench.runner import (
    RESULTS_CSV,
    RESULTS_JSONL,
    error_summary,
    read_recorded,
    run_cell,
    run_matrix,
)

FAKE_RUN = r'''
import json, os, sys, time
argv = sys.argv[1:]
out = argv[argv.index("--output-dir") + 1]
sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
model = sets["model_name_or_path"]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"model": model, "pid": os.getpid(), "out": out, "t": time.time(),
                        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
os.makedirs(out, exist_ok=True)
if model == "oom":
    print("Traceback (most recent call last):")
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(1)
if model == "crash":
    print("ValueError: something broke", flush=True)
    sys.exit(3)
if model == "hang" or (model == "hang-once" and os.environ.get("FAKE_HANG")):
    print("loading...", flush=True)
    time.sleep(120)
steps = int(sets.get("max_steps", 3))
tps = {"ok-fast": 2000.0, "ok-slow": 1000.0}.get(model, 1500.0)
if model == "flood":
    while True:
        print("still going", flush=True)
        time.sleep(0.01)
for step in range(1, steps + 1):
    sys.stderr.write(f"\r{step}/{steps} [00:01<00:02]")  # a tqdm bar, which shares the line with the next print
    sys.stderr.flush()
    print("FMSACCEL_PROGRESS " + json.dumps({"step": step, "max_steps": steps, "tokens_per_second": tps,
                                             "loss": 2.0}), flush=True)
metrics = {"train_tokens_per_second": tps, "train_runtime": 1.5, "train_loss": 2.0, "final_loss": 1.9,
           "losses": [2.1, 2.0, 1.9], "mem_peak_torch_mem_alloc_in_bytes": 4 * 2**30,
           "mem_torch_mem_alloc_in_bytes": 2**30, "num_gpus": 0, "gpu": "fake-gpu",
           "versions": {"torch": "9.9", "python": "3.x"}, "recipe": "x",
           "args": {"r": 16, "output_dir": out, "model_name_or_path": "/resolved/path"}}
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f)
if model == "slow-exit":
    time.sleep(120)
if model == "ok-sleep":  # holds its GPUs a while: side-by-side cells overlap
    time.sleep(3)
    with open(os.environ["FAKE_LOG"] + ".ends", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "t": time.time()}) + "\n")
'''

SCENARIOS = """
scenarios:
  - name: baseline-peft-bnb
    framework_config: [baseline-peft-bnb]
    arguments: {peft_method: lora, r: 16, model_name_or_path: [ok-slow]}
  - name: accelerated-peft-bnb
    framework_config: [accelerated-peft-bnb]
    arguments: {peft_method: lora, r: 16, model_name_or_path: [ok-fast, oom, crash, hang-once, ok-slow]}
"""


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    log = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_HANG", raising=False)
    return [sys.executable, str(script)], log


def _starts(log: Path) -> list[str]:
    return [json.loads(line)["model"] for line in log.read_text().splitlines()] if log.exists() else []


def _cells(tmp_path: Path, models: list[str] | None = None) -> list[Cell]:
    path = tmp_path / "scenarios.yaml"
    path.write_text(SCENARIOS)
    cells, _ = expand(load_scenarios(path), {"max_steps": 3}, effective_batch_sizes=[4], num_gpus=[1], models=models)
    return cells


def test_failures_become_rows_and_the_matrix_goes_on(tmp_path, fake):
    run_prefix, log = fake
    out = tmp_path / "out"
    summary = run_matrix(_cells(tmp_path), out, timeout_s=60, run_prefix=run_prefix,
                         console=Console(file=open(os.devnull, "w")), show_progress=False)
    assert summary.statuses == {"ok": 4, "oom": 1, "crash": 1}
    rows = {r["model_name_or_path"]: r for r in read_recorded(out) if r["scenario"] == "accelerated-peft-bnb"}
    assert rows["oom"]["status"] == "oom" and "CUDA out of memory" in rows["oom"]["error_messages"]
    assert rows["oom"]["error"] == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["crash"]["status"] == "crash" and rows["crash"]["returncode"] == 3
    assert rows["crash"]["error"] == "ValueError: something broke"
    assert "ValueError: something broke" in rows["crash"]["error_messages"]
    ok = rows["ok-fast"]
    assert ok["status"] == "ok" and ok["error_messages"] == "" and ok["train_tokens_per_second"] == 2000.0
    assert ok["model_name_or_path"] == "ok-fast" and ok["num_gpus"] == 1  # the cell's coordinates win
    assert ok["gpu_device_name"] == "fake-gpu" and ok["version_torch"] == "9.9"
    assert (Path(ok["cell_dir"]) / "output.log").read_text().count("FMSACCEL_PROGRESS") == 3
    assert (Path(ok["cell_dir"]) / "command.sh").exists()
    # the ratio to the baseline-peft-bnb cell of the same model/batch/GPUs (ok-slow has one, ok-fast does not)
    slow = next(r for r in read_recorded(out) if r["model_name_or_path"] == "ok-slow"
                and r["scenario"] == "accelerated-peft-bnb")
    assert slow["train_tokens_per_second_vs_baseline"] == 1.0 and ok["train_tokens_per_second_vs_baseline"] is None
    with open(out / RESULTS_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    for column in ("framework_config", "peft_method", "model_name_or_path", "num_gpus", "per_device_train_batch_size",
                   "r", "train_tokens_per_second", "mem_peak_torch_mem_alloc_in_bytes", "status", "error_messages",
                   "train_tokens_per_second_vs_baseline", "gpu_device_name"):
        assert column in table[0], column
    assert "losses" not in table[0]  # nested fields stay in the JSONL
    assert _starts(log) == ["ok-slow", "ok-fast", "oom", "crash", "hang-once", "ok-slow"]


def test_error_summary_finds_the_worker_error_under_torchrun_noise():
    lines = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "[rank0]: ValueError: False is not a valid SaveStrategy",
        "E1126 failed (exitcode: 1) local_rank: 0",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
        "============================================================",
    ]
    assert error_summary(lines) == "ValueError: False is not a valid SaveStrategy"
    assert error_summary(["a", "torch.OutOfMemoryError: CUDA out of memory.", "RuntimeError: later"]) == (
        "torch.OutOfMemoryError: CUDA out of memory."
    )
    assert error_summary(["just a line", ""]) == "just a line"


@pytest.mark.parametrize("model, first_line", [("hang", "loading..."), ("flood", "still going")])
def test_timeout_stops_the_cell_and_is_recorded(tmp_path, fake, model, first_line):
    run_prefix, _ = fake
    cell = _cells(tmp_path, models=[model])[0]
    start = time.monotonic()
    outcome = run_cell(cell.command(run_prefix, tmp_path / "cell"), tmp_path / "cell", timeout_s=1.0,
                       kill_grace_s=2.0)
    assert outcome.status == "timeout" and outcome.returncode is None
    assert time.monotonic() - start < 15
    assert first_line in outcome.tail and "timeout after 1 s" in outcome.tail[-1]


def test_a_run_that_wrote_its_results_but_did_not_exit_is_ok(tmp_path, fake):
    """metrics.json comes last, after the adapter: a cell stopped after it lost only its exit (seen on a GPU host)."""
    run_prefix, _ = fake
    cell = _cells(tmp_path, models=["slow-exit"])[0]
    outcome = run_cell(cell.command(run_prefix, tmp_path / "cell"), tmp_path / "cell", timeout_s=3.0,
                       kill_grace_s=2.0, exit_grace_s=60.0)
    assert outcome.status == "ok" and outcome.metrics["train_tokens_per_second"] == 1500.0
    assert "had not exited at the timeout" in outcome.tail[-1]
    from fmsaccel_cli.bench.runner import cell_row

    row = cell_row(cell, outcome, tmp_path / "cell", [])
    assert row["status"] == "ok" and "had not exited at the timeout" in row["error"]


def test_a_run_that_lingers_after_its_results_is_stopped_and_ok(tmp_path, fake):
    """The bench does not wait out a slow teardown: the cell's group is stopped ``exit_grace_s`` after its results."""
    run_prefix, _ = fake
    cell = _cells(tmp_path, models=["slow-exit"])[0]
    start = time.monotonic()
    outcome = run_cell(cell.command(run_prefix, tmp_path / "cell"), tmp_path / "cell", timeout_s=60.0,
                       kill_grace_s=2.0, exit_grace_s=1.0)
    assert time.monotonic() - start < 20
    assert outcome.status == "ok" and outcome.returncode is None and outcome.metrics["final_loss"] == 1.9
    assert "1 s after: stopped" in outcome.tail[-1] and outcome.exit_s is not None and 1.0 <= outcome.exit_s < 10
    assert "stopping the cell" in (tmp_path / "cell" / "output.log").read_text()


def test_a_run_that_exits_records_its_teardown_time(tmp_path, fake):
    run_prefix, _ = fake
    cell = _cells(tmp_path, models=["ok-fast"])[0]
    outcome = run_cell(cell.command(run_prefix, tmp_path / "cell"), tmp_path / "cell", timeout_s=60.0)
    assert outcome.status == "ok" and outcome.returncode == 0
    assert outcome.exit_s is None or 0 <= outcome.exit_s < 5  # None: it exited before the first look


def test_progress_lines_reach_the_display(tmp_path, fake):
    run_prefix, _ = fake
    cell = _cells(tmp_path, models=["ok-fast"])[0]
    events = []
    outcome = run_cell(cell.command(run_prefix, tmp_path / "cell"), tmp_path / "cell", timeout_s=60,
                       on_progress=events.append)
    assert outcome.status == "ok"
    assert [(e["step"], e["max_steps"], e["tokens_per_second"]) for e in events] == [(1, 3, 2000.0), (2, 3, 2000.0),
                                                                                      (3, 3, 2000.0)]


def test_existing_results_need_resume(tmp_path, fake):
    from fmsaccel_cli.bench.matrix import BenchError

    run_prefix, log = fake
    cells = _cells(tmp_path, models=["ok-fast"])
    quiet = Console(file=open(os.devnull, "w"))
    run_matrix(cells, tmp_path / "out", run_prefix=run_prefix, console=quiet, show_progress=False)
    with pytest.raises(BenchError, match="pass --resume"):
        run_matrix(cells, tmp_path / "out", run_prefix=run_prefix, console=quiet, show_progress=False)
    summary = run_matrix(cells, tmp_path / "out", resume=True, run_prefix=run_prefix, console=quiet,
                         show_progress=False)
    assert (summary.ran, summary.skipped) == (0, 2)
    assert _starts(log) == ["ok-fast", "ok-fast"]


def test_retry_failed_reruns_only_failures(tmp_path, fake):
    run_prefix, log = fake
    cells = _cells(tmp_path, models=["ok-fast", "crash"])
    quiet = Console(file=open(os.devnull, "w"))
    run_matrix(cells, tmp_path / "out", run_prefix=run_prefix, console=quiet, show_progress=False)
    run_matrix(cells, tmp_path / "out", resume=True, retry_failed=True, run_prefix=run_prefix, console=quiet,
               show_progress=False)
    assert sorted(_starts(log)) == ["crash", "crash", "crash", "crash", "ok-fast", "ok-fast"]
    assert len(read_recorded(tmp_path / "out")) == 4


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the orphan check relies on Linux PDEATHSIG")
def test_kill_and_resume_loses_nothing_and_repeats_nothing(tmp_path, fake):
    run_prefix, log = fake
    (tmp_path / "scenarios.yaml").write_text(textwrap.dedent(SCENARIOS))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fmsaccel_cli.bench.cli", "--matrix", str(tmp_path / "scenarios.yaml"),
               "--effective-batch-size", "4", "--out", str(out), "--set", "max_steps=3"]
    env = {**os.environ, "FMSACCEL_BENCH_RUN_CMD": " ".join(run_prefix), "FAKE_HANG": "1"}
    bench = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: "hang-once" in _starts(log))  # four cells recorded, the fifth is running
        recorded_before = read_recorded(out)
        bench.send_signal(signal.SIGKILL)
        bench.wait(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert [r["model_name_or_path"] for r in recorded_before] == ["ok-slow", "ok-fast", "oom", "crash"]
    hung_pid = json.loads(log.read_text().splitlines()[-1])["pid"]
    _wait_for(lambda: not _alive(hung_pid), timeout=15)  # the cell died with the bench: no orphan
    assert read_recorded(out) == recorded_before  # the kill lost nothing, tore nothing

    del env["FAKE_HANG"]
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_recorded(out)
    assert [r["model_name_or_path"] for r in rows] == ["ok-slow", "ok-fast", "oom", "crash", "hang-once", "ok-slow"]
    assert len({r["cell_id"] for r in rows}) == 6
    # each cell started once, except the one that was running when the bench died
    assert _starts(log) == ["ok-slow", "ok-fast", "oom", "crash", "hang-once", "hang-once", "ok-slow"]
    assert (out / RESULTS_JSONL).read_text().count("\n") == 6
    assert "4 already recorded" in done.stdout


def test_devices_run_cells_side_by_side_each_on_its_own_gpus(tmp_path, fake):
    run_prefix, log = fake
    path = tmp_path / "scenarios.yaml"
    path.write_text(SCENARIOS.replace("[ok-fast, oom, crash, hang-once, ok-slow]", "[ok-sleep]")
                    .replace("[ok-slow]", "[ok-sleep]"))
    cells, _ = expand(load_scenarios(path), {"max_steps": 3}, effective_batch_sizes=[4, 8], num_gpus=[1, 2])
    assert sorted(c.num_gpus for c in cells) == [1, 1, 1, 1, 2, 2, 2, 2]
    summary = run_matrix(cells, tmp_path / "out", run_prefix=run_prefix, devices=["5", "7", "9"],
                         console=Console(file=open(os.devnull, "w")), show_progress=False)
    assert summary.statuses == {"ok": 8}
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    ends = {e["pid"]: e["t"] for e in map(json.loads, Path(f"{log}.ends").read_text().splitlines())}
    spans = [(s["t"], ends[s["pid"]], set(s["gpus"].split(","))) for s in starts]
    wanted = {c.dir_name: c.num_gpus for c in cells}
    assert sorted(len(set(s["gpus"].split(","))) - wanted[Path(s["out"]).name] for s in starts) == [0] * 8
    assert all(gpus <= {"5", "7", "9"} for _, _, gpus in spans)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping  # cells ran at the same time...
    assert all(not (a[2] & b[2]) for a, b in overlapping)  # ...never on the same GPU
    assert len(read_recorded(tmp_path / "out")) == 8


def test_a_cell_needing_more_gpus_than_devices_is_an_error(tmp_path, fake):
    from fmsaccel_cli.bench.matrix import BenchError

    run_prefix, _ = fake
    path = tmp_path / "scenarios.yaml"
    path.write_text(SCENARIOS)
    cells, _ = expand(load_scenarios(path), {"max_steps": 3}, effective_batch_sizes=[4], num_gpus=[2])
    with pytest.raises(BenchError, match="needs 2 GPUs; --devices gives 1 \\(0\\)"):
        run_matrix(cells, tmp_path / "out", run_prefix=run_prefix, devices=["0"], show_progress=False)


def test_sigterm_stops_every_cell_running_side_by_side(tmp_path, fake):
    run_prefix, log = fake
    path = tmp_path / "scenarios.yaml"
    path.write_text(SCENARIOS.replace("[ok-fast, oom, crash, hang-once, ok-slow]", "[hang, hang-once]"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fmsaccel_cli.bench.cli", "--matrix", str(path), "--effective-batch-size", "4",
               "--out", str(out), "--devices", "0,1"]
    env = {**os.environ, "FMSACCEL_BENCH_RUN_CMD": " ".join(run_prefix), "FAKE_HANG": "1"}
    bench = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: {"hang", "hang-once"} <= set(_starts(log)))  # both hanging cells are running
        pids = [json.loads(line)["pid"] for line in log.read_text().splitlines() if '"hang' in line]
        bench.send_signal(signal.SIGTERM)
        output, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 130, output
    for pid in pids:
        _wait_for(lambda pid=pid: not _alive(pid), timeout=15)
    assert [r["model_name_or_path"] for r in read_recorded(out)] == ["ok-slow"]  # the stopped cells: unrecorded
