"""Spread the scenarios matrix over the GPUs of one machine, one cell per GPU at a time, and merge the results.

  python benchmarks/gpu/matrix_streams.py plan MATRIX_DIR GPUS WORKLOAD...   -> lines "GPU WORKLOAD RECIPE,RECIPE,..."
  python benchmarks/gpu/matrix_streams.py merge MATRIX_DIR OUT_DIR          -> one results set, ratios recomputed

`plan` leaves out the cells already recorded under MATRIX_DIR (any status: a failed cell is not retried), puts each
workload's baseline-peft-bnb cell first on its GPU when the machine has not measured it yet, and balances the rest by
an estimate of each cell's seconds (longest first onto the least loaded GPU). `merge` reads every results.jsonl under
MATRIX_DIR and writes them as one bench results folder, so every cell gets its ratio to the baseline measured on this
machine, whichever GPU ran it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fmsaccel_cli.bench.matrix import NO_PLUGIN, expand, load_defaults, load_scenarios
from fmsaccel_cli.bench.runner import write_results

BASELINE = "baseline-peft-bnb"
SECONDS = {"P": 75, "R": 55}  # a cell's start, load, 12 steps and exit on an H100, from earlier calls
COMPILED_EXTRA = 80  # the recipes that compile their decoder layers (foak-padding-free) pay this once


def _recipes(workload: str) -> list[str]:
    matrix = Path("benchmarks/scenarios.yaml")
    cells, _ = expand(load_scenarios(matrix), load_defaults(matrix.parent / "defaults.yaml"),
                      effective_batch_sizes=[4], num_gpus=[1], models=["llama3-8b"],
                      overrides={"training_data_path": f"workload:{workload}"})
    return [c.framework_config or NO_PLUGIN for c in cells]


def _recorded(matrix_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(matrix_dir.glob("*/results.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def plan(matrix_dir: Path, gpus: int, workloads: list[str]) -> list[tuple[int, str, list[str]]]:
    done = {(r.get("training_data_path"), r.get("framework_config")) for r in _recorded(matrix_dir)}
    load = [0.0] * gpus
    streams: list[list[tuple[str, str]]] = [[] for _ in range(gpus)]
    todo = []
    for i, workload in enumerate(workloads):
        for recipe in _recipes(workload):
            if (f"workload:{workload}", recipe) in done:
                continue
            if recipe == BASELINE:  # first, each workload on its own GPU
                gpu = i % gpus
                streams[gpu].insert(0, (workload, recipe))
                load[gpu] += SECONDS[workload]
            else:
                todo.append((SECONDS[workload] + COMPILED_EXTRA * recipe.endswith("foak-padding-free"),
                             workload, recipe))
    for seconds, workload, recipe in sorted(todo, reverse=True):
        gpu = load.index(min(load))
        streams[gpu].append((workload, recipe))
        load[gpu] += seconds
    out = []
    for gpu, stream in enumerate(streams):  # one bench per (GPU, workload), in the order the stream runs them
        for workload in dict.fromkeys(w for w, _ in stream):
            out.append((gpu, workload, [r for w, r in stream if w == workload]))
    return out


def merge(matrix_dir: Path, out_dir: Path) -> int:
    """The latest row of each cell (a bench cut by the call's end may have been planned again)."""
    latest = {r.get("cell_id"): r for r in _recorded(matrix_dir)}  # folders sort by their call's start time
    rows = list(latest.values())
    out_dir.mkdir(parents=True, exist_ok=True)  # outside MATRIX_DIR, or the next merge would read it back
    write_results(out_dir, rows)
    return len(rows)


if __name__ == "__main__":
    command, matrix_dir = sys.argv[1], Path(sys.argv[2])
    if command == "plan":
        for gpu, workload, recipes in plan(matrix_dir, int(sys.argv[3]), sys.argv[4:]):
            print(gpu, workload, ",".join(recipes))
    else:
        print(f"merged {merge(matrix_dir, Path(sys.argv[3]))} rows into {sys.argv[3]}")
