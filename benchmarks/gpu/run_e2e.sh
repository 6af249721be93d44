#!/usr/bin/env bash
# GPU call: fmsaccel bench for RECIPES on llama3-8b with one WORKLOAD (P or R), the baseline in the same call.
# Every cell profiles its last two warm-up steps (FMSACCEL_PROFILE); the top kernels land in $OUT/profiles.txt.
# The device call's limit (CALL_S, default 590 s of its 600) bounds the whole script: the bench gets what setup left,
# less the time to copy results (BENCH_TIMEOUT caps it further), so a long matrix is cut, never the copying.
set -u
START=$(date +%s)
source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -1
export FMSACCEL_PROFILE=1
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # a recompile in the measured steps shows in the logs, with its guard
VARIANT_TIMEOUT=${VARIANT_RECIPES:+${VARIANT_TIMEOUT:-150}}  # kept for the variant matrix, when there is one
LEFT=$(( ${CALL_S:-590} - ($(date +%s) - START) - 20 - ${VARIANT_TIMEOUT:-0} ))
BENCH_TIMEOUT=$(( ${BENCH_TIMEOUT:-$LEFT} < LEFT ? ${BENCH_TIMEOUT:-$LEFT} : LEFT ))
echo "setup took $(( $(date +%s) - START )) s; the bench gets ${BENCH_TIMEOUT} s"
timeout ${BENCH_TIMEOUT} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$RECIPES" \
  --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out /tmp/bench-$WORKLOAD --timeout 240 --resume \
  ${EXTRA:-} 2>&1 | grep -vE "^\s*$" | tail -20
cp /tmp/bench-$WORKLOAD/results.csv $OUT/results-$WORKLOAD.csv 2>/dev/null
for f in $(find /tmp/bench-$WORKLOAD -name profile.txt); do echo "=== $f"; cat "$f"; done > $OUT/profiles-$WORKLOAD.txt
for f in $(find /tmp/bench-$WORKLOAD -name "*.log"); do echo "=== $f"; grep -E "\[fmsaccel\]|Error|error" "$f" | tail -25; done > $OUT/logs-$WORKLOAD.txt
for f in $(find /tmp/bench-$WORKLOAD -name "*.log"); do echo "=== $f"; grep -A4 "Recompiling" "$f" | head -60; done \
  > $OUT/recompiles-$WORKLOAD.txt
# Optional second matrix (VARIANT_RECIPES set): the same workload on the same machine with one more setting,
# VARIANT_SET (default: the flex padding-free backend; e.g. plugins.peft.quantization.fused_ops_and_kernels.fp8_matmul=true
# or pad_to_multiple_of=256), and VARIANT_ENV="NAME=value ..." in its environment (e.g. TORCHINDUCTOR_CPP_WRAPPER=1)
if [ -n "${VARIANT_RECIPES:-}" ]; then
  timeout ${VARIANT_TIMEOUT} env ${VARIANT_ENV:-} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$VARIANT_RECIPES" \
    --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out /tmp/bench-$WORKLOAD-variant --timeout ${VARIANT_CELL_TIMEOUT:-140} \
    --set "${VARIANT_SET:-plugins.training.attention.padding_free.backend=flex}" 2>&1 | grep -vE "^\s*$" | tail -5
  cp /tmp/bench-$WORKLOAD-variant/results.csv $OUT/results-$WORKLOAD-variant.csv 2>/dev/null
  # the variant's cell logs too (a cell that dies before its first step leaves no row, only its log)
  for f in $(find /tmp/bench-$WORKLOAD-variant -name "*.log"); do echo "=== $f"; grep -E "\[fmsaccel\]|Error|error" "$f" | tail -25; done \
    > $OUT/logs-$WORKLOAD-variant.txt
  for f in $(find /tmp/bench-$WORKLOAD-variant -name "*.log"); do echo "=== $f"; grep -A4 "Recompiling" "$f" | head -60; done \
    > $OUT/recompiles-$WORKLOAD-variant.txt
fi
true  # the missing results of a cut matrix are not the script's failure
