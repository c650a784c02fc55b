#!/usr/bin/env bash
# The GPU check in one call: bench/gpu_check.sh [--dry-run] [OUTDIR] [-- GPU_CHECK_ARGS...]
#   (see bench/gpu_check.py --help: --steps, --deadline-s, --label-args, --train-args, --label-images)
#
# On the GPU host (torch, no Ray, no network) it starts with `source .gpukit/install.sh` (build the kit on the CPU
# machine first: bash ../shared/gpu-kit/build). --dry-run runs the same steps on CPU at tiny sizes with the
# project's .venv; `make test` runs it. OUTDIR (default gpu-check-out/, git-ignored) gets gpu_check.log, one log
# per job, summary.json and the tracebacks of failed steps. The last line of the output is the JSON summary.
# Example, a 9-minute GPU call: bench/gpu_check.sh "$OUT" -- --deadline-s 500 --label-args "--cudnn benchmark"
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
out=gpu-check-out
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --) shift; break ;;  # the rest goes to bench/gpu_check.py
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $1 (usage: bench/gpu_check.sh [--dry-run] [OUTDIR] [-- GPU_CHECK_ARGS...])" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
mkdir -p "$out" || exit 2
if [ "$dry" = 1 ]; then
  python=.venv/bin/python
  [ -x "$python" ] || { echo "error: no .venv here: run make venv first" >&2; exit 2; }
  "$python" bench/gpu_check.py --dry-run --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
else
  [ -f .gpukit/install.sh ] || { echo "error: no .gpukit/ here: build it with bash ../shared/gpu-kit/build and carry it" >&2; exit 2; }
  # shellcheck disable=SC1091
  source .gpukit/install.sh || { echo "error: .gpukit/install.sh failed" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/nvidia-smi.txt"
  python3 bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
fi
exit "${PIPESTATUS[0]}"
