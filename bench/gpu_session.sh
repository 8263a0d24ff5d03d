#!/usr/bin/env bash
# Issue #8's GPU figures in one device `run`, most important first, inside a deadline.
#
# A task that is lent a GPU gets ~15 minutes of device time in all (start-up included) and 10 per command, so the
# checks run as one prepared command: each step gets what is left of the budget, a step that would start with too
# little is skipped (and says so); each step's output goes to $OUT/steps.log (below).
# Record what came back in bench/RESULTS.md; the next lent session passes the steps still missing in STEPS.
# Exit 0: every step ran and passed; 1: a step failed; 3: the ones that ran passed, some were skipped for time.
# $OUT gets two files (the device returns at most 8): summary.txt and steps.log (every step's table, its FIGURE lines
# and a `row {json}` line per finished row).
#
#   device run, carry [".whl"], timeout_s 600:   bash bench/gpu_session.sh 540
#   (the budget: at most the device's budget_left_s minus ~3 min of start-up, so the run's limit never cuts it short)
#   only some steps:                             STEPS="mem_7b_qlora sweep_7b" bash bench/gpu_session.sh 540
#   the same sequence on this CPU (tiny shapes): TINY=1 OUT=/tmp/gpu-session bash bench/gpu_session.sh 1200
#
# .whl comes from ../shared/gpu/fetch-wheels.sh (see bench/README.md); the lent machine lacks trl, bitsandbytes,
# datasets and deepspeed. Steps, in order (names for STEPS):
#   qlora_24gb     qlora_7b with the 1xRTX3090-24GB plan, process capped at 24 GiB: peak (goal <= 20 GiB)
#   qlora_speed    qlora_7b with this GPU's plan vs plain TRL+PEFT defaults, side by side: tokens/s (>= 1.5x), MFU
#   mem_7b_qlora   memory_accuracy rows 11-14 (7B QLoRA): predicted vs max_memory_allocated (+-10 % each)
#   mem_small      memory_accuracy rows 0-7 (0.5B / 1.5B)
#   mem_7b_lora    memory_accuracy rows 8-10 (7B LoRA, bf16 base)
#   sweep_7b       plan_sweep, llama-2-7b QLoRA, micro 1,4,16: chosen plan vs the sweep's best (>= 95 %, 0 OOM)
#   sweep          plan_sweep, qwen2.5-1.5b LoRA seq 2048
#   liger          qlora_7b with this GPU's plan, Liger kernels off and on: tokens/s, per-step losses (needs the
#                  liger-kernel wheel in .whl, see bench/README.md; skipped without it)
set -u -o pipefail  # a failed preflight must stop the run, not hide behind tee's status
budget=${1:-540}
start=$SECONDS
OUT=${OUT:?set OUT (the device tool sets it)}
mkdir -p "$OUT"
PY=${PY:-python3}
# No step launches DeepSpeed, and once installed accelerate imports it (save_pretrained, the Trainer's unwrap), which
# pulls pydantic 2 and its typing_extensions >= 4.14 that the image may lack: leave DeepSpeed and its needs out.
# TINY=1 (this CPU, Python 3.11) never installs the cp312 wheels.
if [ -z "${TINY:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  wheels=$(ls .whl/*.whl | grep -v -E '/(deepspeed|pydantic|pydantic_core|hjson|annotated_types|typing_inspection)-')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "installing .whl failed"; exit 1; }
fi
export FTLAUNCH_BENCH_CACHE=${FTLAUNCH_BENCH_CACHE:-/tmp/bench-models} HF_HUB_OFFLINE=1
STEPS=${STEPS:-"qlora_24gb qlora_speed mem_7b_qlora mem_small mem_7b_lora sweep_7b sweep liger"}
MIN_STEP_S=${MIN_STEP_S:-60}  # a step needs at least this long to produce a figure

# step arguments: the GPU's, or (TINY=1) the --tiny code-path check's, whose configuration lists are shorter
args_for() {
  if [ -n "${TINY:-}" ]; then
    case $1 in
      qlora_24gb) echo "bench/qlora_7b.py --tiny --only rtx3090" ;;
      qlora_speed) echo "bench/qlora_7b.py --tiny --only ftlaunch,baseline" ;;
      mem_7b_qlora) echo "bench/memory_accuracy.py --tiny --only 5" ;;
      mem_small) echo "bench/memory_accuracy.py --tiny --only 0,1" ;;
      mem_7b_lora) echo "bench/memory_accuracy.py --tiny --only 3" ;;
      sweep_7b) echo "bench/plan_sweep.py --tiny --micro 1,8" ;;
      sweep) echo "bench/plan_sweep.py --tiny" ;;
      liger) echo "bench/qlora_7b.py --tiny --only liger" ;;
      *) return 1 ;;
    esac
  else
    case $1 in
      qlora_24gb) echo "bench/qlora_7b.py --only rtx3090" ;;
      qlora_speed) echo "bench/qlora_7b.py --only ftlaunch,baseline" ;;
      mem_7b_qlora) echo "bench/memory_accuracy.py --only 11,12,13,14" ;;
      mem_small) echo "bench/memory_accuracy.py --only 0,1,2,3,4,5,6,7" ;;
      mem_7b_lora) echo "bench/memory_accuracy.py --only 8,9,10" ;;
      sweep_7b) echo "bench/plan_sweep.py --card llama-2-7b --method qlora --micro 1,4,16" ;;
      sweep) echo "bench/plan_sweep.py" ;;
      liger) echo "bench/qlora_7b.py --only ftlaunch,liger" ;;
      *) return 1 ;;
    esac
  fi
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  git rev-parse --short HEAD 2>/dev/null; echo "budget ${budget} s, steps: $STEPS"; } | tee "$OUT/summary.txt"
# ~10 s: the libraries import, and (on a GPU) bitsandbytes quantises to NF4; stop here rather than fail every step
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.txt" || { echo "preflight failed" | tee -a "$OUT/summary.txt"; exit 1; }
import importlib, sys
versions = {n: getattr(importlib.import_module(n), "__version__", "?")
            for n in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes")}
print("versions:", " ".join(f"{k} {v}" for k, v in versions.items()))
import torch
if torch.cuda.is_available():
    import bitsandbytes.functional as bnbf
    q, state = bnbf.quantize_4bit(torch.randn(256, 256, dtype=torch.bfloat16, device="cuda"), quant_type="nf4")
    print("bitsandbytes NF4 on", torch.cuda.get_device_name(), "ok:", tuple(q.shape))
PY
liger_wheel=$(ls .whl/liger_kernel-*.whl 2>/dev/null | head -n 1)
failed=0 skipped=0
: >"$OUT/steps.log"
for name in $STEPS; do
  cmd=$(args_for "$name") || { echo "unknown step '$name'" | tee -a "$OUT/summary.txt"; failed=1; continue; }
  left=$((budget - (SECONDS - start)))
  if [ "$name" = liger ] && [ -z "${TINY:-}" ] && [ -z "$liger_wheel" ]; then
    echo "$name: skipped, no liger-kernel wheel in .whl" | tee -a "$OUT/summary.txt"
    continue
  fi
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    echo "$name: skipped, ${left} s left" | tee -a "$OUT/summary.txt"
    skipped=1
    continue
  fi
  echo "== $name: $PY $cmd (${left} s left)" | tee -a "$OUT/steps.log"
  # at the deadline: SIGINT, KILL 15 s later; each finished row is already in the log as a `row {json}` line
  timeout --signal=INT --kill-after=15 "$left" $PY $cmd >/tmp/step.txt 2>&1
  rc=$?
  cat /tmp/step.txt >>"$OUT/steps.log"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 4 ] || failed=1  # 4: every row ran, a goal was missed (the figure is the result)
  echo "$name: exit $rc$([ "$rc" -eq 4 ] && echo ' (goal missed)') after $((SECONDS - start)) s" \
    | tee -a "$OUT/summary.txt" "$OUT/steps.log"
  grep -v -E "Warning|warn\(|it/s\]|^\[|^   row " /tmp/step.txt | tail -n 20  # the table and its FIGURE lines
  grep "FIGURE" /tmp/step.txt >>"$OUT/summary.txt"
done
# 1: a step failed (or was unknown); 3: every step that ran passed, but some were skipped for time
[ "$failed" -ne 0 ] && exit 1
[ "$skipped" -ne 0 ] && exit 3
exit 0
