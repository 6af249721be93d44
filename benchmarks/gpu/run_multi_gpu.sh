#!/usr/bin/env bash
# GPU call on the 2-GPU machine (issue 9): llama3-8b QLoRA and GPTQ-LoRA, both with foak and padding-free, workload R:
#   1 GPU (batch 4, 2 accumulation steps) | DDP on 2 GPUs (4 each) | FSDP on 2 GPUs (4 each)
# Every setup trains on the same 8 examples per optimizer step, so the per-step loss must match the 1-GPU run; each
# GPU runs the same micro-batch of 4, so tokens/s (all ranks) should scale >= 1.8x under DDP, and the FSDP peak
# memory per GPU should stay <= 0.6x the 1-GPU figure. If time is left, a 1-GPU run with the 8 examples in one
# micro-batch (1gpu-b8) is added: the same global batch without accumulation (more activation memory, and on this
# launch-bound workload more tokens/s per GPU). SETUPS with b4 adds a 1-GPU run of one micro-batch of 4 per optimizer
# step (1gpu-b4): the per-GPU work of each DDP rank (weak scaling), while 1gpu (2 accumulation steps) is the same global
# batch; DDP scaling is reported against both. Prints a table; CSV, metrics and log tails in $OUT.
#   bash benchmarks/gpu/run_multi_gpu.sh            (run from the repo root, with .whl carried)
# Env: KINDS="qlora gptq" (a subset to split the work over two calls), SETUPS="ddp fsdp b8" (the 2-GPU setups and
# the one-pass batch-8 reference to run; the 1-GPU reference always runs), STEPS=12, WARMUP=4, BUDGET_S=510 (runs that
# would start later are skipped and reported, so a slow machine still returns what it measured), HF_GC=1 adds an
# FSDP run that keeps transformers' gradient checkpointing (activation_checkpointing: false) for comparison;
# FMSACCEL_MEMORY=1 adds each run's allocations alive at its peak memory to log_tails.txt; ONLY="gptq-ddp2 qlora-fsdp2"
# runs just those 2-GPU runs (with the 1-GPU references of KINDS); EXTRA_SET="key=value ..." adds --set options to every run;
# FMSACCEL_PROFILE=1 copies each run's profile (rank 0) to $OUT/profile-NAME.txt. REF=0 skips the 1-GPU run with 2
# accumulation steps (the loss reference); SETUPS with ddpl adds DDP runs that keep TRL's metrics on each rank
# (distributed.gather_step_metrics: false) beside the default ones, which gather them in every micro-step as TRL does.
# Issue 9's DDP scaling with multipack across ranks (session 8, README "Multi-GPU"): KINDS="qlora gptq" SETUPS="b4 ddp"
# REF=0 STEPS=16 WARMUP=6 EXTRA_SET="max_seq_length=2048 plugins.training.dataloader.multipack.num_processes=1
# plugins.peft.quantization.fused_ops_and_kernels.compile_layers=false" (about 5 minutes on a fresh machine).
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/multi-gpu-out}}
mkdir -p "$OUT"
# NVLink multicast stays off on these machines (a program using it can take the host's GPUs down)
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
source benchmarks/gpu/setup_device.sh || exit 1
python3 -c "import accelerate, torch; print('accelerate', accelerate.__version__, '| GPUs', torch.cuda.device_count())"
KINDS=${KINDS:-qlora gptq}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
BUDGET_S=${BUDGET_S:-510}
RUNS=/tmp/multi-gpu-runs  # other KINDS' runs from an earlier call on this warm machine stay in the table
for kind in $KINDS; do rm -rf "$RUNS/$kind"-*; done
mkdir -p $RUNS
python3 -c "from fmsaccel_cli.models import materialize; print(materialize('llama3-8b'))" 2>&1 | tail -1
echo "llama3-8b ready after $(( $(date +%s) - START )) s"

recipe_of() { [ "$1" = qlora ] && echo accelerated-peft-bnb-foak-padding-free || echo accelerated-peft-autogptq-foak-padding-free; }

# run NAME KIND GPUS BATCH [--set ...]: one `fmsaccel run`; its log goes to $RUNS/NAME.log. A fixed example count
# keeps the generated workload the same for every batch size (by default it grows with the per-device batch).
run() {
  local name=$1 kind=$2 gpus=$3 batch=$4; shift 4
  if [ -n "${ONLY:-}" ] && [ "$gpus" -gt 1 ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  rm -rf "$RUNS/$name"
  timeout 240 fmsaccel run --recipe "$(recipe_of "$kind")" --model llama3-8b --data workload:R -o "$RUNS/$name" \
    --nproc-per-node "$gpus" --no-install --set max_steps="$STEPS" --set benchmark_warmup_steps="$WARMUP" \
    --set gradient_checkpointing=true --set max_seq_length=4096 --set save_strategy=no --set logging_steps=1 \
    --set learning_rate=2.0e-4 --set lora_dropout=0.0 --set per_device_train_batch_size="$batch" \
    --set num_train_examples=$(( STEPS * 64 )) $(for kv in ${EXTRA_SET:-}; do printf -- '--set %s ' "$kv"; done) "$@" \
    > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - START )) s"
}

in_budget() {  # a 2-GPU run takes about 70 s, 150 s where it compiles its layers; start one only if it can finish
  if [ $(( $(date +%s) - START )) -gt $(( BUDGET_S - ${RUN_S:-150} )) ]; then echo "$1: skipped (time budget)"; return 1; fi
}

# the 1-GPU references run side by side, one per GPU (separate processes and GPUs: their figures are independent);
# the GPTQ one quantises llama3-8b to 4-bit RTN into the cache on its first use
wanted() { [[ " ${SETUPS:-ddp fsdp b8} " == *" $1 "* ]]; }  # SETUPS: which of ddp, fsdp, b8, b4 to run

one_gpu_runs() {  # one_gpu_runs SUFFIX BATCH [--set ...]: the 1-GPU run of every kind, side by side on the GPUs
  local suffix=$1 batch=$2; shift 2
  local pids=() gpu=0
  for kind in $KINDS; do
    (export CUDA_VISIBLE_DEVICES=$gpu; run "$kind-$suffix" "$kind" 1 "$batch" "$@") & pids+=($!)
    gpu=$(( (gpu + 1) % 2 ))
  done
  wait "${pids[@]}"
}
[ "${REF:-1}" = 1 ] && one_gpu_runs 1gpu 4 --set gradient_accumulation_steps=2
wanted b4 && one_gpu_runs 1gpu-b4 4
for kind in $KINDS; do
  wanted ddp && in_budget "$kind-ddp2" && run "$kind-ddp2" "$kind" 2 4
done
for kind in $KINDS; do  # ddpl: DDP with TRL's metrics kept on each rank (no cross-rank wait mid-step), for comparison
  wanted ddpl && in_budget "$kind-ddpl2" && run "$kind-ddpl2" "$kind" 2 4 --set distributed.gather_step_metrics=false
done
for kind in $KINDS; do
  wanted fsdp && in_budget "$kind-fsdp2" && run "$kind-fsdp2" "$kind" 2 4 --set distributed.strategy=fsdp
done
wanted b8 && in_budget "1gpu-b8" && one_gpu_runs 1gpu-b8 8
if [ "${HF_GC:-0}" = 1 ]; then
  for kind in $KINDS; do
    in_budget "$kind-fsdp2-hfgc" && run "$kind-fsdp2-hfgc" "$kind" 2 4 --set distributed.strategy=fsdp \
      --set distributed.fsdp.activation_checkpointing=false
  done
fi

python3 - "$RUNS" "$OUT" <<'EOF'
"""Table and CSV: tokens/s over all ranks, scaling vs 1 GPU, peak memory per GPU vs 1 GPU, loss vs 1 GPU, adapter."""
import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks/gpu")
from tables import print_table, write_csv  # noqa: E402

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for log in sorted(runs.glob("*.log")):
    name = log.stem
    kind, setup = name.split("-", 1)
    run_dir = runs / name
    row = {"run": name, "kind": kind, "setup": setup}
    metrics_file = run_dir / "metrics.json"
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-60:]
    profile = run_dir / "profile.txt"  # FMSACCEL_PROFILE=1: rank 0's last two warm-up steps
    if profile.exists():
        (out / f"profile-{name}.txt").write_text(profile.read_text())
    peak = run_dir / "memory_peak.txt"  # FMSACCEL_MEMORY=1: what is alive at the peak
    with open(out / "log_tails.txt", "a") as f:  # one file: the device tool returns a few files only
        f.write(f"=== {name}\n" + "\n".join(tail) + "\n")
        if peak.exists():
            f.write(f"--- {name} memory at the peak\n{peak.read_text()}")
    if not metrics_file.exists():
        errors = [ln for ln in tail if "error" in ln.lower() and "ChildFailedError" not in ln]
        error = next((ln for ln in errors if "[fmsaccel] error" in ln), errors[0] if errors else
                     (tail[-1] if tail else "no output"))
        rows.append({**row, "status": "failed", "error": error[-200:]})
        continue
    m = json.loads(metrics_file.read_text())
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"run": name, **m}) + "\n")
    adapter = run_dir / "adapter_model.safetensors"
    tensors = 0
    if adapter.exists():
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            tensors = len(list(f.keys()))
    notes = [n["note"] for n in m["patch_report"]["notes"] if n["plugin"] == "distributed"]
    rows.append({**row, "status": "ok", "world_size": m["world_size"],
                 "tokens_per_s_total": round(m["train_tokens_per_second_total"], 1),
                 "tokens_per_s_per_gpu": round(m["train_tokens_per_second"], 1),
                 # rank 0's median measured step, over all ranks (one slow step does not move it)
                 "median_step_tps_total": round((m.get("train_tokens_per_second_median_step") or 0) * m["world_size"], 1)
                 or None,
                 "peak_mem_gib": round(m["mem_peak_torch_mem_alloc_in_bytes"] / 2**30, 2),
                 "first_loss": round(m["losses"][0], 4), "final_loss": round(m["losses"][-1], 4),
                 "losses": m["losses"], "adapter_tensors": tensors, "gpu": m["gpu"], "notes": " | ".join(notes),
                 # rank 0's mean seconds per step: forward+backward / optimizer / step end / between steps
                 "step_phases": "/".join(f"{v:.3f}" for v in (m.get("step_seconds") or {}).values())})

reference = {r["kind"]: r for r in rows if r["setup"] == "1gpu" and r["status"] == "ok"}
one_pass = {r["kind"]: r for r in rows if r["setup"] == "1gpu-b8" and r["status"] == "ok"}
per_gpu = {r["kind"]: r for r in rows if r["setup"] == "1gpu-b4" and r["status"] == "ok"}
for r in rows:
    ref = reference.get(r["kind"]) or per_gpu.get(r["kind"])  # REF=0: memory against the one micro-batch of 4
    if r["status"] != "ok" or ref is None or r["setup"].startswith("1gpu"):
        continue
    if r["kind"] in one_pass and one_pass[r["kind"]]["peak_mem_gib"]:
        r["mem_vs_1gpu_b8"] = round(r["peak_mem_gib"] / one_pass[r["kind"]]["peak_mem_gib"], 3)
    if r["kind"] in reference:
        r["scaling_vs_1gpu"] = round(r["tokens_per_s_total"] / ref["tokens_per_s_total"], 3)
        pairs = list(zip(r["losses"], ref["losses"], strict=True)) if len(r["losses"]) == len(ref["losses"]) else []
        r["max_loss_rel_diff"] = round(max(abs(a - b) / abs(b) for a, b in pairs), 4) if pairs else None
    if r["kind"] in per_gpu:  # the same micro-batch per GPU and optimizer step as each rank
        b4 = per_gpu[r["kind"]]
        r["scaling_vs_1gpu_b4"] = round(r["tokens_per_s_total"] / b4["tokens_per_s_total"], 3)
        if r.get("median_step_tps_total") and b4.get("median_step_tps_total"):
            r["median_step_scaling_vs_1gpu_b4"] = round(r["median_step_tps_total"] / b4["median_step_tps_total"], 3)
    r["mem_vs_1gpu"] = round(r["peak_mem_gib"] / ref["peak_mem_gib"], 3) if ref["peak_mem_gib"] else None
    scaling = " ".join(f"{key.removeprefix('scaling_vs_')}:{'ok' if r[key] >= 1.8 else 'MISSED'}"
                       for key in ("scaling_vs_1gpu", "scaling_vs_1gpu_b4") if key in r)
    r["targets"] = (f"scaling>=1.8 {scaling}"
                    if "ddp" in r["setup"] else
                    "mem<=0.6 " + ("ok" if (r["mem_vs_1gpu"] or 9) <= 0.6 else "MISSED"))

columns = ["run", "status", "tokens_per_s_total", "scaling_vs_1gpu", "scaling_vs_1gpu_b4", "median_step_tps_total",
           "median_step_scaling_vs_1gpu_b4", "peak_mem_gib", "mem_vs_1gpu", "mem_vs_1gpu_b8",
           "first_loss",
           "final_loss", "max_loss_rel_diff", "adapter_tensors", "targets", "step_phases"]
print_table(rows, columns)
for r in rows:
    if r["status"] != "ok":
        print(f"{r['run']} failed: {r['error']}")
    elif r.get("notes"):
        print(f"{r['run']}: {r['notes']}")
write_csv(out / "multi_gpu.csv", rows,
          columns + ["kind", "setup", "world_size", "tokens_per_s_per_gpu", "gpu", "notes", "error"])
print(f"wrote {out / 'multi_gpu.csv'}, {out / 'metrics.jsonl'} and {out / 'log_tails.txt'}")
EOF
echo "total $(( $(date +%s) - START )) s"
