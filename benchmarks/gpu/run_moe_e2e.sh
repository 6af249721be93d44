#!/usr/bin/env bash
# GPU call (issue 8): MoE training end to end on workload R against plain transformers (its default experts
# implementation: grouped_mm in transformers 5.x) in the same call, on random models of two shapes:
# granite-3.0-3b-a800m and mixtral-8x7b with LAYERS_MIXTRAL decoder layers (default 2: full fine-tuning of more does
# not fit one 80 GB card), each with full fine-tuning and with LoRA (r16 α16 dropout 0.1 on q/k/v/o):
#   plain (full-finetuning / standard-peft) | moe-scattermoe-granite-ep1 (ScatterMoE alone) |
#   moe-scattermoe-granite-ep1-padding-free-foak
# Bars: ScatterMoE alone >= 1.5x plain tokens/s at no more peak memory; with padding-free and fused ops >= 2.5x.
# On 2 GPUs (nvidia-h100-x2) EP=1 adds granite full fine-tuning with ep1 (DDP) and ep2 (experts sharded) on both.
# Prints a table; CSV, metrics and log tails in $OUT.
#   bash benchmarks/gpu/run_moe_e2e.sh           (from the repo root, with .whl carried)
# Env: MODELS="granite mixtral", METHODS="full lora", RECIPES (default: the two above; the plain run always goes
# first; an entry RECIPE@KEY=VALUE+KEY=VALUE adds --set options, e.g.
# moe-scattermoe-granite-ep1@plugins.training.moe.scattermoe.compile_layers=false, run as ep1-moe.compile_layers_false), PROFILE=1 (FMSACCEL_PROFILE: a
# profile of the last two warm-up steps, copied to $OUT/RUN.profile.txt), STEPS=20, WARMUP=4, EP=1 (2-GPU runs; needs 2 GPUs), CALL_S=570 (runs that would end past it are skipped:
# a run takes RUN_S=100 s), TORCH_LOGS (default recompiles: each run's count of mid-run recompiles is a column),
# MODEL=NAME:SHAPE pairs to test with other shapes (e.g. "granite:tiny-granitemoe").
set -u
START=$(date +%s)
OUT=${OUT:-${1:-/tmp/moe-e2e-out}}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast here
[ -n "${NO_SETUP:-}" ] || source benchmarks/gpu/setup_device.sh || exit 1
STEPS=${STEPS:-20}
[ -n "${PROFILE:-}" ] && export FMSACCEL_PROFILE=1
export TORCH_LOGS=${TORCH_LOGS-recompiles}  # a compiled layer recompiling mid-run is a slow step: the table counts them
WARMUP=${WARMUP:-4}
RUNS=${RUNS:-/tmp/moe-e2e-runs-$(echo "${MODELS:-all}-${METHODS:-all}-${EP:-0}" | tr ' ' _)}  # one per selection:
# two selections can run side by side on different GPUs, each with its own OUT:
#   CUDA_VISIBLE_DEVICES=2 MODELS=mixtral bash benchmarks/gpu/run_moe_e2e.sh $OUT/mixtral &
rm -rf "$RUNS" && mkdir -p "$RUNS"

shape_of() {  # the built-in shape behind a short model name (MODEL=granite:tiny-granitemoe overrides)
  for pair in ${MODEL:-}; do [ "${pair%%:*}" = "$1" ] && { echo "${pair#*:}"; return; }; done
  [ "$1" = granite ] && echo granite-3.0-3b-a800m || echo mixtral-8x7b
}
method_sets() {  # the --set options of a method (the same for every recipe, so the plain run is comparable)
  if [ "$1" = lora ]; then
    echo "--set peft_method=lora --set r=16 --set lora_alpha=16 --set lora_dropout=0.1 --set target_modules=[q_proj,k_proj,v_proj,o_proj]"
  else
    echo "--set peft_method=null"
  fi
}

# run NAME RECIPE MODEL METHOD GPUS: one `fmsaccel run`, skipped when it could not finish inside the call
run() {
  local name=$1 recipe=${2%%@*} model=$3 method=$4 gpus=$5 layers=() sets=()
  if [ "$2" != "$recipe" ]; then
    IFS=+ read -ra pairs <<< "${2#*@}"
    for pair in "${pairs[@]}"; do sets+=(--set "$pair"); done
  fi
  if [ $(( $(date +%s) - START + ${RUN_S:-100} )) -gt "${CALL_S:-570}" ]; then echo "$name: skipped (time budget)"; return; fi
  [ "$model" = mixtral ] && layers=(--set "shape_overrides.num_hidden_layers=${LAYERS_MIXTRAL:-2}")
  timeout 240 fmsaccel run --recipe "$recipe" --model "$(shape_of "$model")" --data workload:R -o "$RUNS/$name" \
    --nproc-per-node "$gpus" --no-install --set max_steps="$STEPS" --set benchmark_warmup_steps="$WARMUP" \
    --set gradient_checkpointing=true --set max_seq_length=2048 --set save_strategy=no --set logging_steps=1 \
    --set learning_rate=5.0e-5 --set per_device_train_batch_size=4 --set num_train_examples=$(( STEPS * 8 )) \
    $(method_sets "$method") "${layers[@]}" "${sets[@]}" > "$RUNS/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - START )) s"
  [ -f "$RUNS/$name/profile.txt" ] && cp "$RUNS/$name/profile.txt" "$OUT/$name.profile.txt"
}

for model in ${MODELS-granite mixtral}; do  # MODELS="" with EP=1: the 2-GPU runs alone
  for method in ${METHODS:-full lora}; do
    plain=$([ "$method" = lora ] && echo standard-peft || echo full-finetuning)
    run "$model-$method-plain" "$plain" "$model" "$method" 1
    for recipe in ${RECIPES:-moe-scattermoe-granite-ep1 moe-scattermoe-granite-ep1-padding-free-foak}; do
      label=${recipe#moe-scattermoe-granite-}
      if [ "$label" != "${label%%@*}" ]; then  # ep1@plugins.training.moe.scattermoe.compile_layers=false -> ep1-moe.compile_layers_false
        sets=${label#*@}; sets=${sets//plugins.training./}; sets=${sets//fused_ops_and_kernels/foak}
        sets=${sets//moe.scattermoe/moe}; sets=${sets//=/_}; label="${label%%@*}-${sets//+/-}"
      fi
      run "$model-$method-$label" "$recipe" "$model" "$method" 1
    done
  done
done
if [ "${EP:-0}" = 1 ]; then
  run granite-full-ep1x2 moe-scattermoe-granite-ep1 granite full 2
  run granite-full-ep2x2 moe-scattermoe-granite-ep2 granite full 2
fi

python3 - "$RUNS" "$OUT" <<'EOF'
"""Tokens/s and peak memory per run, as ratios to the plain transformers run of the same model and method."""
import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks/gpu")
from tables import print_table, write_csv  # noqa: E402

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for log in sorted(runs.glob("*.log"), key=lambda p: p.stat().st_mtime):
    model, method, setup = log.stem.split("-", 2)
    row = {"run": log.stem, "model": model, "method": method, "setup": setup}
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    with open(out / "log_tails.txt", "a") as f:
        f.write(f"=== {log.stem}\n" + "\n".join(lines[-40:]) + "\n")
    metrics = runs / log.stem / "metrics.json"
    if not metrics.exists():
        errors = ([ln for ln in lines if "[fmsaccel] error" in ln] or
                  [ln for ln in lines if "Error: " in ln and "ChildFailedError" not in ln])
        rows.append({**row, "status": "failed", "error": (errors or lines or ["no output"])[-1][-200:]})
        continue
    row["recompiles"] = sum("Recompiling function" in ln for ln in lines)
    m = json.loads(metrics.read_text())
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"run": log.stem, **m}) + "\n")
    moe = [p["what"] for p in m["patch_report"]["patches"] if p["plugin"] == "accelerated-moe"]
    rows.append({**row, "status": "ok", "world_size": m["world_size"], "gpu": m["gpu"],
                 "tokens_per_s_total": round(m["train_tokens_per_second_total"], 1),
                 "peak_mem_gib": round(m["mem_peak_torch_mem_alloc_in_bytes"] / 2**30, 2),
                 "final_loss": round(m["losses"][-1], 4), "experts": "; ".join(moe)})

plain = {(r["model"], r["method"]): r for r in rows if r["setup"] == "plain" and r["status"] == "ok"}
bars = {"ep1": 1.5, "ep1-padding-free-foak": 2.5}
for r in rows:
    ref = plain.get((r["model"], r["method"]))
    if r["status"] != "ok" or ref is None or r is ref:
        continue
    r["vs_plain"] = round(r["tokens_per_s_total"] / ref["tokens_per_s_total"], 3)
    r["mem_vs_plain"] = round(r["peak_mem_gib"] / ref["peak_mem_gib"], 3) if ref["peak_mem_gib"] else None  # CPU: 0
    if r["setup"] in bars:
        ok = r["vs_plain"] >= bars[r["setup"]] and (r["setup"] != "ep1" or (r["mem_vs_plain"] or 9) <= 1.0)
        r["target"] = f">={bars[r['setup']]}x" + (" at <=1.0x memory" if r["setup"] == "ep1" else "") + \
            (" ok" if ok else " MISSED")

ep1x2 = next((r for r in rows if r["setup"] == "ep1x2" and r["status"] == "ok"), None)
for r in rows:  # expert parallelism against data parallelism on the same 2 GPUs
    if r["setup"] == "ep2x2" and r["status"] == "ok" and ep1x2:
        r["vs_ep1x2"] = round(r["tokens_per_s_total"] / ep1x2["tokens_per_s_total"], 3)
        r["mem_vs_ep1x2"] = round(r["peak_mem_gib"] / ep1x2["peak_mem_gib"], 3)

columns = ["run", "status", "tokens_per_s_total", "vs_plain", "peak_mem_gib", "mem_vs_plain", "final_loss", "target",
           "vs_ep1x2", "mem_vs_ep1x2", "recompiles"]
print_table(rows, columns)
for r in rows:
    if r["status"] != "ok":
        print(f"{r['run']} failed: {r['error']}")
write_csv(out / "moe_e2e.csv", rows, columns + ["model", "method", "setup", "world_size", "gpu", "experts", "error"])
print(f"wrote {out / 'moe_e2e.csv'}, {out / 'metrics.jsonl'} and {out / 'log_tails.txt'}")
EOF
echo "total $(( $(date +%s) - START )) s"
