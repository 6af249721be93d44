#!/usr/bin/env bash
# GPU call: plain TRL QLoRA vs baseline-peft-bnb vs accelerated-peft-bnb on llama3-8b, workloads P and R.
# Run from the repo root on the GPU machine with .whl carried; results land in $OUT.
# PROFILE_RECIPES (optional): more recipes on workload R in the same call, each profiled (FMSACCEL_PROFILE).
set -u
source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -2
for w in P R; do
  timeout 150 python3 benchmarks/plain_trl_reference.py --workload $w --out $OUT/plain_trl.jsonl 2>&1 \
    | grep -E "PLAIN_TRL|Error|error" | tail -3
done
FMSACCEL_PROFILE=1 timeout ${BENCH_TIMEOUT:-330} fmsaccel bench --matrix benchmarks/scenarios.yaml --recipes ${RECIPES:-baseline-peft-bnb,accelerated-peft-bnb} \
  --effective-batch-size 4 --num-gpus 1 --out /tmp/bench --timeout 200 --resume 2>&1 | tail -12
cp /tmp/bench/results.csv /tmp/bench/results.jsonl $OUT/ 2>/dev/null
if [ -n "${PROFILE_RECIPES:-}" ]; then
  FMSACCEL_PROFILE=1 timeout ${PROFILE_TIMEOUT:-240} fmsaccel bench --matrix benchmarks/scenarios.yaml \
    --recipes "$PROFILE_RECIPES" --data workload:R --effective-batch-size 4 --num-gpus 1 --out /tmp/bench-prof \
    --timeout 150 2>&1 | tail -6
  cp /tmp/bench-prof/results.csv $OUT/results-profiled.csv 2>/dev/null
fi
for f in $(find /tmp/bench /tmp/bench-prof -name profile.txt 2>/dev/null); do echo "=== $f"; cat "$f"; done > $OUT/profiles.txt
