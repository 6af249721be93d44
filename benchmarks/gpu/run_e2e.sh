#!/usr/bin/env bash
# GPU call: fmsaccel bench for RECIPES on llama3-8b with one WORKLOAD (P or R), the baseline in the same call.
# Every cell profiles its last two warm-up steps (FMSACCEL_PROFILE). $OUT gets three files (the device tool returns
# eight at most): console output as the caller tees it, summary-$WORKLOAD.txt, and details-$WORKLOAD.tgz with every
# matrix's results CSV, its cells' plugin lines, errors and recompiles, and the profiles' top kernels.
# VARIANT_RECIPES + VARIANTS run the same recipes again with one setting changed (below); summary-$WORKLOAD.txt has all.
# The device call's limit (CALL_S, default 590 s of its 600) bounds the whole script: the bench gets what setup left,
# less the time to copy results (BENCH_TIMEOUT caps it further), so a long matrix is cut, never the copying.
set -u
START=$(date +%s)
[ -n "${NO_SETUP:-}" ] || source benchmarks/gpu/setup_device.sh || exit 1  # NO_SETUP: the caller sourced it
# per GPU lane: two lanes of one call on the same workload shared /tmp/bench-P, and --resume let the second reuse the
# first's cells (s15c3)
LANE=${CUDA_VISIBLE_DEVICES:+-gpu${CUDA_VISIBLE_DEVICES//,/_}}
BENCH=/tmp/bench-$WORKLOAD$LANE
mkdir -p "$OUT"; DETAILS=/tmp/e2e-details-$WORKLOAD$LANE
rm -rf $DETAILS; mkdir -p $DETAILS
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -1
export FMSACCEL_PROFILE=1
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # a recompile in the measured steps shows in the logs, with its guard
VARIANT_TIMEOUT=${VARIANT_RECIPES:+${VARIANT_TIMEOUT:-150}}  # kept for the variant matrix, when there is one
LEFT=$(( ${CALL_S:-590} - ($(date +%s) - START) - 20 - ${VARIANT_TIMEOUT:-0} ))
BENCH_TIMEOUT=$(( ${BENCH_TIMEOUT:-$LEFT} < LEFT ? ${BENCH_TIMEOUT:-$LEFT} : LEFT ))
echo "setup took $(( $(date +%s) - START )) s; the bench gets ${BENCH_TIMEOUT} s"
timeout ${BENCH_TIMEOUT} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$RECIPES" \
  --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out $BENCH --timeout 240 --resume \
  ${EXTRA:-} 2>&1 | grep -vE "^\s*$" | tail -20
# collect DIR NAME: a bench folder's results, and from its cell logs (a cell that dies before its first step leaves
# no row, only its log) the plugin lines and errors, and Dynamo's recompiles
collect() {
  cp $1/results.csv $DETAILS/results-$2.csv 2>/dev/null
  for f in $(find $1 -name "*.log"); do echo "=== $f"; grep -E "\[fmsaccel\]|Error|error|cudagraph" "$f" | tail -30; done \
    > $DETAILS/logs-$2.txt
  for f in $(find $1 -name "*.log"); do echo "=== $f"; grep -A4 "Recompiling" "$f" | head -60; done > $DETAILS/recompiles-$2.txt
  for f in $(find $1 -name memory_peak.txt); do echo "=== $f"; head -25 "$f"; done > $DETAILS/memory-$2.txt  # FMSACCEL_MEMORY
  for f in $(find $1 -name profile.txt); do echo "=== $f"; cat "$f"; done > $DETAILS/profiles-$2.txt
}
collect $BENCH $WORKLOAD
# Variants (VARIANT_RECIPES set): the same workload on the same machine, once per entry of
# VARIANTS="label=set:KEY=VALUE label2=env:NAME=VALUE ...": --set options for the run (several joined by +), or an
# environment variable, e.g. compile_model=set:plugins.peft.quantization.fused_ops_and_kernels.compile_layers=model
# cpp_wrapper=env:TORCHINDUCTOR_CPP_WRAPPER=1 flex=set:plugins.training.attention.padding_free.backend=flex.
# Without VARIANTS, one variant "variant" from VARIANT_SET (default: the flex backend) and VARIANT_ENV. Each variant
# runs only if the call has time left for it (with EXTRA's bench options too), and resumes on a warm machine; a
# summary puts every row against the main matrix's baseline, by the mean and by the median step.
if [ -n "${VARIANT_RECIPES:-}" ]; then
  VARIANTS=${VARIANTS:-variant=set:${VARIANT_SET:-plugins.training.attention.padding_free.backend=flex}}
  for entry in $VARIANTS; do
    label=${entry%%=*} spec=${entry#*=}
    left=$(( ${CALL_S:-590} - ($(date +%s) - START) - 20 ))
    if [ "$left" -lt 60 ]; then echo "variant $label: skipped (${left} s left in the call)"; continue; fi
    limit=$(( VARIANT_TIMEOUT < left ? VARIANT_TIMEOUT : left ))
    sets=() envs=(${VARIANT_ENV:-})
    case $spec in
      set:*) IFS=+ read -ra kvs <<< "${spec#set:}"; for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done ;;
      env:*) envs+=("${spec#env:}") ;;
      *) echo "variant $label: '$spec' is neither set:KEY=VALUE nor env:NAME=VALUE"; continue ;;
    esac
    dir=$BENCH-$label
    echo "variant $label ($spec): ${limit} s"
    timeout $limit env "${envs[@]}" fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes "$VARIANT_RECIPES" \
      --data workload:$WORKLOAD --effective-batch-size 4 --num-gpus 1 --out $dir --resume \
      --timeout ${VARIANT_CELL_TIMEOUT:-$(( VARIANT_TIMEOUT - 10 ))} ${EXTRA:-} "${sets[@]}" 2>&1 | grep -vE "^\s*$" | tail -5
    collect $dir $WORKLOAD-$label
  done
fi
python3 benchmarks/gpu/variant_summary.py $DETAILS/results-$WORKLOAD.csv $DETAILS/results-$WORKLOAD-*.csv 2>&1 \
  | tee $OUT/summary-$WORKLOAD.txt
tar czf $OUT/details-$WORKLOAD.tgz -C $DETAILS .
true  # the missing results of a cut matrix are not the script's failure
