#!/usr/bin/env bash
# The GPU checks a session with a lent H100/H200 owes, in as few device calls as possible.
# Each part fits one 10-minute device call; logs and results go under $OUT (default bench/results/gpu_logs).
# Estimates from bench/plan.py (ANCHORS.md times where known, stated guesses otherwise; each run prints
# its own plan first): the three bench parts ~16 minutes together; tests and train are not estimated yet:
#
#   bash bench/gpu_checks.sh tests          # editable install, then `pytest -m gpu` (not estimated yet)
#   bash bench/gpu_checks.sh bench          # ceilings + every quick case                   (~5 min)
#   bash bench/gpu_checks.sh bench-full     # grpo B, moe dgrad/wgrad/ragged, model 4x4096,
#                                           # rollout 64x16x1024                             (~6 min)
#   bash bench/gpu_checks.sh bench-rollout  # rollout 16x16x512 vs transformers (issue 5)    (~5 min)
#   bash bench/gpu_checks.sh train          # the main job on CUDA (1 GPU): step-time split and tokens/s
#
# The device machine gets no .git: pass the commit, resolved on this side, e.g.
#   R1FAST_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_checks.sh bench
# (without it the results are named and marked "unknown-commit"). Copy what comes back under
# bench/results/ and commit it.
#
# The GPU image (torch 2.11, Triton 3.6, transformers 5.17, Python 3.12) lacks liger-kernel (the GRPO loss
# peers of issue 3 and the Liger drop-in tests skip without it) and math-verify (math rewards; the tiny recipe
# does not grade math). Carry them as wheels, as the device README says: liger-kernel==0.8.5, and for
# math-verify==0.9.0 also latex2sympy2_extended==1.11.0 and antlr4-python3-runtime==4.13.2 (1.3 MB together).
# Checked on a CPU venv of that stack (2026-11-24): no r1fast code misses an API there; the CPU suite passes
# except where Triton 3.6's interpreter meets NumPy >= 2.4 (r1fast names it; nothing interprets on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="tests|bench|bench-full|bench-rollout|train"
# [[ == ]] takes @(a|b) without `shopt -s extglob` (a case pattern needs it at parse time: `bash -n` fails)
[[ "${1:-}" == @($PARTS) ]] || { echo "usage: [R1FAST_COMMIT=<commit>] bash bench/gpu_checks.sh $PARTS" >&2; exit 2; }
OUT=${OUT:-bench/results/gpu_logs}
if [ -z "${R1FAST_COMMIT:-}" ] && ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then
    echo "gpu_checks.sh: no .git here and R1FAST_COMMIT unset: results will be marked unknown-commit" >&2
fi
PY=${PYTHON:-python3}  # the GPU image's python3 is the one that holds torch
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1

rc=0  # every step's own exit status counts (a pipe into tee would otherwise report tee's)
case "${1:-}" in
    tests)
        $PY -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/gpu_tests.log"; rc=$((rc | PIPESTATUS[0])) ;;
    bench|bench-full|bench-rollout)
        # one run per part: it measures the ceilings itself (a separate ceilings-only run timed them twice)
        $PY bench/run.py --part "$1" --out "$OUT" 2>&1 | tee "$OUT/$1.log"; rc=$((rc | PIPESTATUS[0])) ;;
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
if not rl:  # the run failed before its first GRPO step: its log above says why
    sys.exit("no GRPO step in metrics.jsonl")
print("mean over", len(rl), "GRPO steps:", {k: round(sum(r[k] for r in rl) / len(rl), 4) for k in keys})
PY
        ;;
esac
[ "$rc" -eq 0 ] || echo "gpu_checks.sh $1: a step failed (exit status $rc); see the logs under $OUT" >&2
exit "$rc"
