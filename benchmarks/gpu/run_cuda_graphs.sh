#!/usr/bin/env bash
# GPU call: does foak's cuda_graphs (with the padding-free length buckets) run, and what does it gain on workload R?
# RECIPE on MODEL (default llama3.2-1b: quick to build and compile) once per entry of RUNS, in the same call:
#   graphs       cuda_graphs + bucket_lengths
#   graphs_nogc  the same without gradient checkpointing (tells a checkpoint/graph-tree clash from the rest)
#   buckets      bucket_lengths alone (compiled layers, no graphs: what the buckets cost)
#   plain        the recipe as it is
# Every run has gradient checkpointing on, as the bench has (GC=false turns it off). Prints tokens/s (mean and median
# step), peak memory and the final loss per run. Each log is cut to its last 400 lines (with counts of Dynamo's
# recompiles and Inductor's "skipping cudagraphs" reasons) so that it fits what comes back in $OUT. The first run also
# builds the model and its 4-bit copy (about 40 s on a fresh machine), so plain goes first by default; a graphs run
# compiles its first step for over 55 s (s9c4), hence RUN_TIMEOUT 240. (Periodic stack dumps through
# faulthandler.dump_traceback_later crashed the trainer with SIGSEGV on Python 3.12 in s9c1: not used.)
#   bash benchmarks/gpu/run_cuda_graphs.sh        (repo root, .whl carried; env: MODEL RECIPE RUNS STEPS WARMUP RUN_TIMEOUT)
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/cuda-graphs-out}}
mkdir -p "$OUT"
source benchmarks/gpu/setup_device.sh || exit 1
MODEL=${MODEL:-llama3.2-1b}
RECIPE=${RECIPE:-accelerated-peft-autogptq-foak-padding-free}
export TORCH_LOGS=${TORCH_LOGS:-recompiles,perf_hints}
GRAPHS="--set plugins.peft.quantization.fused_ops_and_kernels.cuda_graphs=true"
BUCKETS="--set plugins.training.attention.padding_free.bucket_lengths=true"

run() {  # run NAME [--set ...]
  local name=$1 log=/tmp/cg-$1.log; shift
  timeout -k 20 "${RUN_TIMEOUT:-240}" fmsaccel run --recipe "$RECIPE" --model "$MODEL" --data workload:R \
    -o "/tmp/cg-$name" --no-install --set max_steps="${STEPS:-30}" --set benchmark_warmup_steps="${WARMUP:-15}" \
    --set gradient_checkpointing="${GC:-true}" --set save_strategy=no --set logging_steps=1 "$@" > $log 2>&1
  echo "$name: exit $? after $(( $(date +%s) - START )) s"
  { echo "$(wc -l < $log) lines; recompiles: $(grep -c Recompiling $log)"
    grep -ho "skipping cudagraphs[^\n]\{0,160\}" $log | sort | uniq -c | sort -rn | head -20
    echo "--- last 400 lines"; tail -n 400 $log | cut -c1-400; } > "$OUT/$name.log"
}
for name in ${RUNS:-plain graphs}; do
  case $name in
    graphs) run graphs $GRAPHS $BUCKETS ;;
    graphs_nogc) run graphs_nogc $GRAPHS $BUCKETS --set gradient_checkpointing=false ;;
    buckets) run buckets $BUCKETS ;;
    plain) run plain ;;
    *) echo "unknown run '$name'" ;;
  esac
done
RUNS="${RUNS:-plain graphs}" python3 - <<'PY'
import json
import os
from pathlib import Path

for name in os.environ["RUNS"].split():
    path = Path(f"/tmp/cg-{name}/metrics.json")
    if not path.exists():
        print(f"{name}: no metrics.json (see {name}.log)")
        continue
    m = json.loads(path.read_text())
    print(f"{name}: {m.get('train_tokens_per_second', 0):,.0f} tok/s, median step "
          f"{m.get('train_tokens_per_second_median_step', 0):,.0f} tok/s, peak "
          f"{m.get('mem_peak_torch_mem_alloc_in_bytes', 0) / 2**30:.2f} GiB, final loss {m.get('final_loss')}, "
          f"step times {m.get('step_times')}")
PY
echo "total $(( $(date +%s) - START )) s"
