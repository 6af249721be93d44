#!/usr/bin/env bash
# GPU call: does foak's cuda_graphs (with the padding-free length buckets) run, and what does it gain on workload R?
# RECIPE on MODEL (default llama3.2-1b: quick to build and compile) twice in the same call, with and without CUDA
# graphs; prints tokens/s (mean and median step), peak memory and the final loss. Each run's log, with Dynamo's
# recompiles and Inductor's perf hints (a "skipping cudagraphs" line says why graphs were not used), lands in $OUT.
#   bash benchmarks/gpu/run_cuda_graphs.sh        (repo root, .whl carried; env: MODEL RECIPE STEPS WARMUP RUN_TIMEOUT)
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/cuda-graphs-out}}
mkdir -p "$OUT"
source benchmarks/gpu/setup_device.sh || exit 1
MODEL=${MODEL:-llama3.2-1b}
RECIPE=${RECIPE:-accelerated-peft-autogptq-foak-padding-free}
export TORCH_LOGS=${TORCH_LOGS:-recompiles,perf_hints}

run() {  # run NAME [--set ...]
  local name=$1; shift
  timeout "${RUN_TIMEOUT:-150}" fmsaccel run --recipe "$RECIPE" --model "$MODEL" --data workload:R -o "/tmp/cg-$name" \
    --no-install --set max_steps="${STEPS:-30}" --set benchmark_warmup_steps="${WARMUP:-15}" --set save_strategy=no \
    --set logging_steps=1 "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - START )) s"
}
run graphs --set plugins.peft.quantization.fused_ops_and_kernels.cuda_graphs=true \
  --set plugins.training.attention.padding_free.bucket_lengths=true
run plain
python3 - <<'PY'
import json
from pathlib import Path

for name in ("graphs", "plain"):
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
grep -h "skipping cudagraphs\|CUDA graphs\|cudagraph" "$OUT"/graphs.log | sort | uniq -c | head -20
echo "total $(( $(date +%s) - START )) s"
