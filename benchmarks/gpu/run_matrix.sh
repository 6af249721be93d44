#!/usr/bin/env bash
# GPU call (issue 7): benchmarks/scenarios.yaml on llama3-8b, every recipe that is not `slow`, on workloads P and R,
# each workload's matrix beginning with its baseline-peft-bnb cell. Resumable over several calls: the matrices live in
# MATRIX_DIR (default /tmp/matrix, which a warm machine keeps between calls), each call runs `fmsaccel bench --resume`
# until its time is up (the cell it cuts is run again next time), then copies every result so far to $OUT.
# With two GPUs visible, P runs on the first and R on the second at the same time (one cell per GPU).
#   bash benchmarks/gpu/run_matrix.sh $OUT        (from the repo root, with .whl carried)
# Env: WORKLOADS="P R", MODEL=llama3-8b, NO_SETUP=1 (a CPU check: MODEL=tiny-llama), CALL_S=590 (the whole call, setup included), CELL_TIMEOUT=300, EXTRA (more bench options,
# e.g. "--set max_steps=12" or "--recipes a,b").
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/matrix-out}}
MATRIX_DIR=${MATRIX_DIR:-/tmp/matrix}
mkdir -p "$OUT" "$MATRIX_DIR"
MODEL=${MODEL:-llama3-8b}
[ -n "${NO_SETUP:-}" ] || source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('$MODEL'))" 2>&1 | tail -1
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
DEADLINE=$(( START + ${CALL_S:-590} - 15 ))  # 15 s left to copy the results
echo "setup took $(( $(date +%s) - START )) s; the benches get $(( DEADLINE - $(date +%s) )) s; ${GPUS} GPU(s)"

bench() {  # bench WORKLOAD GPU SECONDS
  CUDA_VISIBLE_DEVICES=$2 timeout "$3" fmsaccel bench --matrix benchmarks/scenarios.yaml --models "$MODEL" \
    --data "workload:$1" --effective-batch-size 4 --num-gpus 1 --out "$MATRIX_DIR/$1" --resume \
    --timeout "${CELL_TIMEOUT:-300}" ${EXTRA:-} >> "$MATRIX_DIR/$1.console" 2>&1
  echo "workload $1: bench ended (exit $?) after $(( $(date +%s) - START )) s"
}

read -r -a workloads <<< "${WORKLOADS:-P R}"
if [ "$GPUS" -ge 2 ] && [ "${#workloads[@]}" -ge 2 ]; then
  bench "${workloads[0]}" 0 $(( DEADLINE - $(date +%s) )) &
  bench "${workloads[1]}" 1 $(( DEADLINE - $(date +%s) )) &
  wait
else
  for w in "${workloads[@]}"; do
    [ $(( DEADLINE - $(date +%s) )) -gt 60 ] && bench "$w" 0 $(( DEADLINE - $(date +%s) ))
  done
fi

for w in "${workloads[@]}"; do
  cp "$MATRIX_DIR/$w/results.csv" "$OUT/results-$w.csv" 2>/dev/null
  cp "$MATRIX_DIR/$w/results.jsonl" "$OUT/results-$w.jsonl" 2>/dev/null
  grep -vE "^\s*$" "$MATRIX_DIR/$w.console" 2>/dev/null | grep -E "ok |fail|oom|timeout|crash|error|Error" | tail -40
  echo "workload $w: $(grep -c '"status": "ok"' "$MATRIX_DIR/$w/results.jsonl" 2>/dev/null || echo 0) ok cell(s) so far"
done
echo "total $(( $(date +%s) - START )) s"
true  # a cut matrix is continued by the next call, not the script's failure
