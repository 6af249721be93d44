#!/usr/bin/env bash
# GPU call (issue 7): benchmarks/scenarios.yaml on llama3-8b, every recipe that is not `slow`, on workloads P and R,
# spread over every GPU of the machine (one cell per GPU at a time; matrix_streams.py balances them), each workload's
# baseline-peft-bnb measured once on this machine. Resumable over calls on a warm machine: results live in MATRIX_DIR
# (default /tmp/matrix, which a warm machine keeps), a call plans only the cells not yet recorded, runs until its time
# is up (the cells it cuts are planned again next call), then merges everything so far into $OUT/results-matrix.*,
# with every cell's ratio to the baseline of this machine.
#   bash benchmarks/gpu/run_matrix.sh $OUT        (from the repo root, with .whl carried)
# Env: WORKLOADS="P R", MODEL=llama3-8b, MATRIX_GPUS="0 1 2" (default: every GPU), CALL_S=590 (the whole call, setup included), CELL_TIMEOUT=300,
# EXTRA (more bench options, e.g. "--set max_steps=12"), NO_SETUP=1 (a CPU check, with MODEL=tiny-llama).
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/matrix-out}}
MATRIX_DIR=${MATRIX_DIR:-/tmp/matrix}
MODEL=${MODEL:-llama3-8b}
mkdir -p "$OUT" "$MATRIX_DIR"
[ -n "${NO_SETUP:-}" ] || source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('$MODEL'))" 2>&1 | tail -1
read -r -a gpus <<< "${MATRIX_GPUS:-$(seq -s ' ' 0 $(( $(nvidia-smi -L 2>/dev/null | wc -l) - 1 )))}"
[ "${#gpus[@]}" -gt 0 ] || gpus=(0)  # no GPU (a CPU check): one stream
DEADLINE=$(( START + ${CALL_S:-590} - 20 ))  # 20 s left to merge and copy the results
echo "setup took $(( $(date +%s) - START )) s; the benches get $(( DEADLINE - $(date +%s) )) s on GPU(s) ${gpus[*]}"

PLAN=$(python3 benchmarks/gpu/matrix_streams.py plan "$MATRIX_DIR" "${#gpus[@]}" ${WORKLOADS:-P R}) || exit 1
echo "$PLAN"
stream() {  # stream INDEX: the benches planned for stream INDEX, on GPU gpus[INDEX], until the deadline
  local index=$1 gpu=${gpus[$1]}
  while read -r i workload recipes; do
    [ "$i" = "$index" ] || continue
    [ $(( DEADLINE - $(date +%s) )) -gt 30 ] || break
    CUDA_VISIBLE_DEVICES=$gpu timeout $(( DEADLINE - $(date +%s) )) fmsaccel bench --matrix benchmarks/scenarios.yaml \
      --models "$MODEL" --data "workload:$workload" --recipes "$recipes" --effective-batch-size 4 --num-gpus 1 \
      --out "$MATRIX_DIR/$START-gpu$gpu-$workload" --timeout "${CELL_TIMEOUT:-300}" ${EXTRA:-} \
      >> "$MATRIX_DIR/gpu$gpu.console" 2>&1
    echo "gpu $gpu, workload $workload: bench ended (exit $?) after $(( $(date +%s) - START )) s"
  done <<< "$PLAN"
}
for index in "${!gpus[@]}"; do stream "$index" & done
wait

python3 benchmarks/gpu/matrix_streams.py merge "$MATRIX_DIR" "$MATRIX_DIR.merged"
cp "$MATRIX_DIR.merged/results.csv" "$OUT/results-matrix.csv" 2>/dev/null
cp "$MATRIX_DIR.merged/results.jsonl" "$OUT/results-matrix.jsonl" 2>/dev/null
cat "$MATRIX_DIR"/gpu*.console 2>/dev/null | grep -E "^(ok|oom|timeout|crash) " | tail -40
fmsaccel bench report "$MATRIX_DIR.merged" 2>&1 | tail -45
echo "total $(( $(date +%s) - START )) s"
true  # a cut matrix is continued by the next call, not the script's failure
