#!/usr/bin/env bash
# The GPU checks a session with a lent H100/H200 owes, in as few device calls as possible.
# Each part fits one 10-minute device call; logs and results go under $OUT (default bench/results/gpu_logs).
#
#   bash bench/gpu_checks.sh tests     # editable install, then `pytest -m gpu`
#   bash bench/gpu_checks.sh bench     # ceilings, then every quick case, results (json + md) into $OUT
#   bash bench/gpu_checks.sh train     # the main job on CUDA (1 GPU): step-time split and tokens/s
#
# Copy what comes back under bench/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in tests|bench|train) ;; *) echo "usage: bash bench/gpu_checks.sh tests|bench|train" >&2; exit 2 ;; esac
OUT=${OUT:-bench/results/gpu_logs}
PY=${PYTHON:-python3}  # the GPU image's python3 is the one that holds torch
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1

rc=0  # every step's own exit status counts (a pipe into tee would otherwise report tee's)
case "${1:-}" in
    tests)
        $PY -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/gpu_tests.log"; rc=$((rc | PIPESTATUS[0])) ;;
    bench)
        $PY bench/run.py --ceilings --out "$OUT" 2>&1 | tee "$OUT/ceilings.log"; rc=$((rc | PIPESTATUS[0]))
        $PY bench/run.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench_quick.log"; rc=$((rc | PIPESTATUS[0])) ;;
    train)
        # the whole log goes under $OUT as it is written (a run killed at the time limit keeps it); the run
        # directory stays in /tmp (its checkpoints are too deep and too many to come back) and only the
        # metrics and the summary are copied out
        runs=/tmp/r1fast_gpu_runs
        $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m r1fast.train \
            --train.out_dir "$runs" 2>&1 | tee "$OUT/main_job.log" | tail -40; rc=$((rc | PIPESTATUS[0]))
        cp "$runs/tiny_r1_zero/metrics.jsonl" "$runs/tiny_r1_zero/summary.json" "$OUT/" 2>/dev/null
        $PY - "$runs/tiny_r1_zero/metrics.jsonl" <<'PY' | tee -a "$OUT/main_job.log"; rc=$((rc | PIPESTATUS[0]))
import json, sys
rl = [r for r in map(json.loads, open(sys.argv[1])) if r.get("phase") == "rl"]
keys = ("time_rollout_s", "time_reward_s", "time_train_s", "generated_tokens_per_s")
print("mean over", len(rl), "GRPO steps:", {k: round(sum(r[k] for r in rl) / len(rl), 4) for k in keys})
PY
        ;;
esac
[ "$rc" -eq 0 ] || echo "gpu_checks.sh $1: a step failed (exit status $rc); see the logs under $OUT" >&2
exit "$rc"
