#!/usr/bin/env bash
# GPU call on a 4- or 8-GPU machine (issue 10): llama3-8b tokens/s on 1, 2, 4 (and 8) GPUs under DDP at the same
# per-device batch of 4 (weak scaling: effective batch 4 x GPUs), for baseline-peft-bnb and
# accelerated-peft-autogptq-foak-padding-free; prints the scaling efficiency, tokens/s per GPU at N over at 1
# (target >= 0.85 at 8). Results (seed CSV columns) land in $OUT/scaling.csv.
#   bash benchmarks/gpu/run_scaling.sh            (run from the repo root, with .whl carried)
# Env: GPUS="1 2 4 8" (default: every count up to the GPUs there), RECIPES, WORKLOAD=R, CELL_TIMEOUT=300 (the padding-free foak recipe compiles its layers on the first step).
set -u
OUT=${OUT:-/tmp/scaling-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast here
source benchmarks/gpu/setup_device.sh || exit 1
available=$(python3 -c "import torch; print(torch.cuda.device_count())")
GPUS=${GPUS:-$(for g in 1 2 4 8; do [ "$g" -le "$available" ] && printf '%s ' "$g"; done)}
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -1
for n in $GPUS; do
  fmsaccel bench --matrix benchmarks/scenarios.yaml \
    --recipes "${RECIPES:-baseline-peft-bnb,accelerated-peft-autogptq-foak-padding-free}" \
    --data "workload:${WORKLOAD:-R}" --num-gpus "$n" --effective-batch-size $(( 4 * n )) \
    --out /tmp/scaling --timeout "${CELL_TIMEOUT:-300}" --resume 2>&1 | grep -E "^(ok|failed|timeout|oom)" | tail -4
  cp /tmp/scaling/results.csv "$OUT/scaling.csv" 2>/dev/null
done
python3 - "$OUT/scaling.csv" <<'PY'
"""Efficiency per recipe: tokens/s per GPU at N GPUs over the 1-GPU figure."""
import csv
import sys

rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["status"] == "ok"]
def key(r):
    return r["framework_config"], r["training_data_path"]


one = {key(r): float(r["train_tokens_per_second"]) for r in rows if r["num_gpus"] == "1"}
print(f"{'recipe':45} {'gpus':>4} {'tok/s/GPU':>10} {'tok/s total':>12} {'efficiency':>10} {'peak GiB':>8}")
for r in sorted(rows, key=lambda r: (r["framework_config"], int(r["num_gpus"]))):
    per_gpu, gpus = float(r["train_tokens_per_second"]), int(r["num_gpus"])
    base = one.get(key(r))
    efficiency = f"{per_gpu / base:.3f}" if base else "-"
    peak = int(float(r["mem_peak_torch_mem_alloc_in_bytes"])) / 2**30
    print(f"{r['framework_config']:45} {gpus:>4} {per_gpu:>10,.0f} {per_gpu * gpus:>12,.0f} {efficiency:>10} {peak:>8.2f}")
PY
