#!/usr/bin/env bash
# Run a cm3jax command on one host with all its local GPUs (one process; jax sees every GPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu.sh [--install] [--gpus=LIST] -- COMMAND [ARGS...]

Runs COMMAND in the repository's .venv with every local GPU visible to one jax process, with the XLA GPU flags that
overlap communication and compute. Logs go to the console and to runs/gpu-<time>.log.

  --install      install cm3jax and jax[cuda12] into .venv first
  --gpus=LIST    restrict to these GPUs (CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3
  --help         this text

Environment: DRY_RUN=1 prints the commands instead of running them.

example:
  launch/gpu.sh --install -- cm3jax train --config=configs/cm3leon.py:350m --workdir=runs/350m \
      --config.train.global_batch_size=64
USAGE
}

INSTALL=0 GPUS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) INSTALL=1 ;;
    --gpus=*) GPUS="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "gpu.sh: no command after -- (see --help)" >&2; exit 2; }

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$INSTALL" == "1" ]]; then
  run python3 -m venv "$ROOT/.venv"
  run "$ROOT/.venv/bin/pip" install -q -e "$ROOT" "jax[cuda12]"
fi
export PATH="$ROOT/.venv/bin:$PATH"
[[ -n "$GPUS" ]] && export CUDA_VISIBLE_DEVICES="$GPUS"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer="
LOG="$ROOT/runs/gpu-$(date +%Y%m%d-%H%M%S).log"
if [[ "${DRY_RUN:-0}" == "1" ]]; then  # a dry run changes nothing: no runs/ folder, no log
  echo "+ CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all} XLA_FLAGS='$XLA_FLAGS'"
  run "$@"
else
  mkdir -p "$ROOT/runs"
  "$@" 2>&1 | tee "$LOG"
  exit "${PIPESTATUS[0]}"
fi
