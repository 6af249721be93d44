#!/usr/bin/env bash
# GPU call (issue 7): benchmarks/scenarios.yaml on llama3-8b, every recipe that is not `slow`, on workloads P and R,
# side by side on every GPU of the machine (`fmsaccel bench --devices`: one cell per GPU, started in matrix order as
# GPUs free up, so each workload's baseline goes first). Resumable over calls on a warm machine: the results live in
# MATRIX_DIR (default /tmp/matrix, which a warm machine keeps) and each call runs `--resume` until its time is up
# (SIGTERM: the cells it cuts are not recorded, and run next call), then copies every result so far to $OUT.
#   bash benchmarks/gpu/run_matrix.sh $OUT        (from the repo root, with .whl carried)
# Env: MODEL=llama3-8b, MATRIX_GPUS=0,1,2 (default: every GPU), CALL_S=590 (the whole call, setup included),
# CELL_TIMEOUT=300, EXTRA (more bench options, e.g. "--data workload:P"), NO_SETUP=1 (a CPU check, MODEL=tiny-llama).
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/matrix-out}}
MATRIX_DIR=${MATRIX_DIR:-/tmp/matrix}
MODEL=${MODEL:-llama3-8b}
mkdir -p "$OUT"
[ -n "${NO_SETUP:-}" ] || source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('$MODEL'))" 2>&1 | tail -1
GPUS=${MATRIX_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)}
DEADLINE=$(( START + ${CALL_S:-590} - 15 ))  # 15 s left to copy the results
echo "setup took $(( $(date +%s) - START )) s; the bench gets $(( DEADLINE - $(date +%s) )) s on GPU(s) ${GPUS:-none}"
timeout $(( DEADLINE - $(date +%s) )) fmsaccel bench --matrix benchmarks/scenarios.yaml --models "$MODEL" \
  --effective-batch-size 4 --num-gpus 1 ${GPUS:+--devices "$GPUS"} --out "$MATRIX_DIR" --resume \
  --timeout "${CELL_TIMEOUT:-300}" ${EXTRA:-} > "$MATRIX_DIR.console" 2>&1
echo "bench ended (exit $?) after $(( $(date +%s) - START )) s"
cp "$MATRIX_DIR/results.csv" "$OUT/results-matrix.csv" 2>/dev/null
cp "$MATRIX_DIR/results.jsonl" "$OUT/results-matrix.jsonl" 2>/dev/null
grep -aE "^(ok|oom|timeout|crash) |error" "$MATRIX_DIR.console" | tail -40
fmsaccel bench report "$MATRIX_DIR" 2>&1 | tail -40
echo "total $(( $(date +%s) - START )) s"
true  # a cut matrix is continued by the next call, not the script's failure
