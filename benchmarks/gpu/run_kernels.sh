#!/usr/bin/env bash
# GPU call: every plugin's kernel check + microbenchmark; CSVs land in $OUT.
set -u
source benchmarks/gpu/setup_device.sh || exit 1
for s in gptq_kernels foak_kernels attention_backends moe_kernels; do
  echo "=== $s"; start=$(date +%s)
  timeout ${KERNEL_TIMEOUT:-170} python3 benchmarks/gpu/$s.py --out $OUT > $OUT/$s.log 2>&1; echo "rc=$? $(( $(date +%s) - start ))s"
  grep -vE "^\s*$|Warning|warn" $OUT/$s.log | tail -${TAIL:-40}
done
