#!/usr/bin/env bash
# The GPU checks of detr-train, as one prepared script for a short GPU session.
#
# A session has about 15 minutes of device time, machine start included, and one command may
# run 10 minutes, so the whole script stops starting steps after DEADLINE seconds (default
# 560) and caps each step with `timeout`. Steps run in order of value; a failing step does
# not stop the next one; a step the deadline leaves out is listed at the end with the command
# that runs it alone. Everything is tee'd into $OUT/gpu_checks.log.
#
#   bash benchmarks/gpu_checks.sh                       # all steps: tests kernel throughput demo overhead
#   bash benchmarks/gpu_checks.sh demo overhead         # only these (the environment is always set up)
#   FULL=1 bash benchmarks/gpu_checks.sh throughput     # every throughput cell (longer than one command)
#
# Steps:
#   env         source .whl/device_env.sh when .whl/ exists (see shared/gpu/README.md), print versions
#   tests       kernel, criterion and accumulation tests on the GPU (TRITON_INTERPRET unset)
#   kernel      benchmarks/msda_kernel.py: deformable attention alone, Triton against PyTorch (fwd and
#               fwd+bwd ms, peak MiB, max |diff|), JSON into $OUT/msda_kernel.json
#   throughput  benchmarks/gpu_throughput.py, default cells, JSON into $OUT/gpu_throughput.json
#   demo        the default demo with model.attention_kernel=triton, then =pytorch (training.amp=true);
#               prints each run's per-epoch seconds (target <= 5 s) and last-epoch mAP (within 0.02)
#   overhead    benchmarks/step_overhead.py --rounds 3
#
# Settings (environment): OUT (default ./gpu_out), DEADLINE (seconds, default 560), PYTHON
# (default python3), RUNS (where the demo runs write, default a fresh folder under /tmp: only
# their metrics.jsonl files are copied into $OUT, since the device tool returns at most 8 files
# from at most 2 folders down), FULL=1 (throughput: --full).
# Files left in $OUT: gpu_checks.log, msda_kernel.json, gpu_throughput.json, metrics_triton.jsonl,
# metrics_pytorch.jsonl.

set -u

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_checks.log"
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-560}
RUNS=${RUNS:-$(mktemp -d /tmp/gpu_checks_runs.XXXXXX)}
START=$(date +%s)
CURRENT_STEP=env
FAILED=()
SKIPPED=()
# The Triton kernels must be compiled for the GPU, not run by Triton's CPU interpreter.
unset TRITON_INTERPRET

say() { echo "$*" | tee -a "$LOG"; }

# Seconds a step may take: its cap, or what is left before the deadline (keeping 15 s for the
# step's kill grace and the summary), whichever is smaller.
step_limit() {
  local cap=$1 left=$(( DEADLINE - ($(date +%s) - START) - 15 ))
  echo $(( cap < left ? cap : left ))
}

# run_step NAME LIMIT COMMAND...: run COMMAND under timeout LIMIT, output tee'd into the log.
run_step() {
  local name=$1 limit=$2; shift 2
  if (( limit < 20 )); then
    say "=== $name: skipped, the ${DEADLINE}s deadline is near ==="
    [[ " ${SKIPPED[*]:-} " == *" $CURRENT_STEP "* ]] || SKIPPED+=("$CURRENT_STEP")
    return
  fi
  say "=== $name (timeout ${limit}s): $* ==="
  local started rc
  started=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "=== $name: exit $rc after $(( $(date +%s) - started ))s$( (( rc == 124 || rc == 137 )) && echo ', timed out') ==="
  (( rc == 0 )) || FAILED+=("$name")
}

step_env() {
  if [[ -d .whl ]]; then
    say "=== env: source .whl/device_env.sh ==="
    # `source` is a shell builtin, so it cannot run under timeout; it only installs local wheels.
    local env_log
    env_log=$(mktemp)
    # shellcheck disable=SC1091
    source .whl/device_env.sh >"$env_log" 2>&1 || FAILED+=("env")
    tee -a "$LOG" <"$env_log"
    rm -f "$env_log"
  fi
  run_step versions "$(step_limit 60)" "$PY" - <<'EOF'
import platform, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"triton {triton_version}, CUDA {torch.version.cuda}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CUDA not available)")
EOF
}

step_tests() {
  run_step tests "$(step_limit 150)" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_deformable_attention_kernel.py tests/test_kernel_self_check.py tests/test_criterion.py \
    tests/test_accumulation.py
}

step_kernel() {
  local limit args=(--json "$OUT/msda_kernel.json")
  limit=$(step_limit 90)
  # No new case after limit - 30 s: the one running then can finish before the timeout.
  args+=(--time-budget $(( limit > 60 ? limit - 30 : limit / 2 )))
  # Without a GPU the benchmark checks itself on small shapes in Triton's CPU interpreter.
  nvidia-smi -L >/dev/null 2>&1 || args+=(--device cpu --scale 32)
  run_step kernel "$limit" "$PY" benchmarks/msda_kernel.py "${args[@]}"
}

step_throughput() {
  local limit args=(--json "$OUT/gpu_throughput.json")
  limit=$(step_limit 330)
  # No new cell after limit - 60 s: the one running then can finish before the timeout.
  args+=(--time-budget $(( limit > 120 ? limit - 60 : limit / 2 )))
  [[ -n "${FULL:-}" ]] && args+=(--full)
  # Without a GPU (checking this script's wiring) the benchmark's own CPU check runs instead.
  nvidia-smi -L >/dev/null 2>&1 || args+=(--device cpu --model-size tiny)
  run_step throughput "$limit" "$PY" benchmarks/gpu_throughput.py "${args[@]}"
}

step_demo() {
  local kernel
  for kernel in triton pytorch; do
    run_step "demo-$kernel" "$(step_limit 120)" "$PY" -m detr_train training.amp=true \
      "model.attention_kernel=$kernel" "output_root=$RUNS" "name=$kernel" training.progress=false
  done
  say "=== demo summary ==="
  "$PY" - "$RUNS" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import sys
from pathlib import Path

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
last_map = {}
for name in ("triton", "pytorch"):
    logs = sorted((runs / name).rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        print(f"{name}: no metrics.jsonl under {runs / name}")
        continue
    text = logs[-1].read_text()
    (out / f"metrics_{name}.jsonl").write_text(text)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    epochs = ", ".join(f"{r['epoch']}: {r['epoch_time']:.1f}s (train {r['epoch_time'] - r.get('eval_time', 0.0):.1f}s)"
                       for r in records)
    slowest = max(r["epoch_time"] for r in records)
    last_map[name] = records[-1].get("map")
    print(f"{name}: {len(records)} epochs, last-epoch mAP {last_map[name]}; seconds per epoch (with eval) {epochs}; "
          f"slowest {slowest:.1f}s (target <= 5 s): {'met' if slowest <= 5 else 'MISSED'}")
if len(last_map) == 2 and None not in last_map.values():
    difference = last_map["triton"] - last_map["pytorch"]
    print(f"mAP triton - pytorch: {difference:+.4f} (target within 0.02): {'met' if abs(difference) <= 0.02 else 'MISSED'}")
EOF
}

step_overhead() {
  run_step overhead "$(step_limit 150)" "$PY" benchmarks/step_overhead.py --rounds 3
}

STEPS=("$@")
(( ${#STEPS[@]} )) || STEPS=(tests kernel throughput demo overhead)
for step in "${STEPS[@]}"; do
  case $step in
    tests|kernel|throughput|demo|overhead) ;;
    *) echo "unknown step '$step'; steps: tests kernel throughput demo overhead" >&2; exit 2 ;;
  esac
done

say "gpu_checks: steps ${STEPS[*]}, deadline ${DEADLINE}s, output $OUT, demo runs in $RUNS, $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
step_env
for CURRENT_STEP in "${STEPS[@]}"; do
  "step_$CURRENT_STEP"
done

say "=== done after $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}; skipped: ${SKIPPED[*]:-none} ==="
if (( ${#SKIPPED[@]} )); then
  say "run the skipped steps with: bash benchmarks/gpu_checks.sh ${SKIPPED[*]/env/}"
fi
