#!/usr/bin/env bash
# GPU call: fmsaccel bench for RECIPES on llama3-8b with one WORKLOAD (P or R), the baseline in the same call.
# Every cell profiles its last two warm-up steps (FMSACCEL_PROFILE); the top kernels land in $OUT/profiles.txt.
set -u
source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -1
export FMSACCEL_PROFILE=1
timeout ${BENCH_TIMEOUT:-500} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$RECIPES" \
  --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out /tmp/bench-$WORKLOAD --timeout 240 --resume \
  ${EXTRA:-} 2>&1 | grep -vE "^\s*$" | tail -20
cp /tmp/bench-$WORKLOAD/results.csv $OUT/results-$WORKLOAD.csv 2>/dev/null
for f in $(find /tmp/bench-$WORKLOAD -name profile.txt); do echo "=== $f"; head -30 "$f"; done > $OUT/profiles-$WORKLOAD.txt
for f in $(find /tmp/bench-$WORKLOAD -name "*.log"); do echo "=== $f"; grep -E "\[fmsaccel\]|Error|error" "$f" | tail -25; done > $OUT/logs-$WORKLOAD.txt
# Optional second matrix with another padding-free backend (FLEX_RECIPES set): same workload, same machine.
if [ -n "${FLEX_RECIPES:-}" ]; then
  timeout ${FLEX_TIMEOUT:-150} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$FLEX_RECIPES" \
    --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out /tmp/bench-$WORKLOAD-flex --timeout 140 \
    --set plugins.training.attention.padding_free.backend=flex 2>&1 | grep -vE "^\s*$" | tail -5
  cp /tmp/bench-$WORKLOAD-flex/results.csv $OUT/results-$WORKLOAD-flex.csv 2>/dev/null
fi
