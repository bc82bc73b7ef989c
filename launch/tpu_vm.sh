#!/usr/bin/env bash
# dprl on a Cloud TPU VM, one host or a pod: every command runs on all workers at once,
# as a multi-host JAX program must (dprl.parallel.distributed finds the pod by itself).
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=dprl-v4-32 ACCELERATOR_TYPE=v4-32
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                       # this checkout -> every worker, pip install
#   launch/tpu_vm.sh run python -m dprl.train --config configs/grpo.py:qwen2_5_vl_3b \
#       --workdir gs://my-bucket/runs/3b --config.model.init_checkpoint=/data/Qwen2.5-VL-3B-Instruct
#   launch/tpu_vm.sh logs                        # follow worker 0 (WORKER=3 for another)
#   launch/tpu_vm.sh stop                        # end the run on every worker
#   launch/tpu_vm.sh delete
#
# Variables (environment): PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE, VERSION (the TPU
# software image; default picked from ACCELERATOR_TYPE), SPOT=1 for a spot VM,
# REMOTE_DIR (checkout on the workers, default dprl), JAX_PACKAGE (default "jax[tpu]"),
# WORKER (for logs; default 0). See launch/README.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh COMMAND [ARGS...]
  create           create the TPU VM ($TPU_NAME, $ACCELERATOR_TYPE in $ZONE of $PROJECT)
  setup            copy this checkout to every worker and install it (pip install -e .)
  run CMD ARGS...  start CMD in $REMOTE_DIR on every worker (detached), then follow logs
  logs             follow the log of worker $WORKER (default 0)
  stop             end the run started by `run` on every worker
  delete           delete the TPU VM
EOF
  exit 2
}

[[ $# -ge 1 ]] || usage
COMMAND=$1
shift

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_NAME=${TPU_NAME:-dprl-${ACCELERATOR_TYPE}}
REMOTE_DIR=${REMOTE_DIR:-dprl}
JAX_PACKAGE=${JAX_PACKAGE:-jax[tpu]}
WORKER=${WORKER:-0}
REMOTE_LOG='$HOME/dprl_run.log'
REMOTE_PID='$HOME/dprl_run.pid'

default_version() {
  case $ACCELERATOR_TYPE in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

need() {
  # Fail before gcloud does, naming the variable rather than a gcloud flag.
  local name=$1
  if [[ -z ${!name:-} ]]; then
    echo "launch/tpu_vm.sh: set $name (e.g. export $name=...)" >&2
    exit 2
  fi
}

gcloud_tpu() {
  need PROJECT
  need ZONE
  gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

case $COMMAND in
  create)
    VERSION=${VERSION:-$(default_version)}
    spot=()
    [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
    gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${spot[@]}"
    ;;
  setup)
    repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    archive=$(mktemp -t dprl.XXXXXX.tar.gz)
    trap 'rm -f "$archive"' EXIT
    # Tracked and untracked-but-not-ignored files: the working tree as it is, without runs/.
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      tar -C "$repo" --null -T - -czf "$archive"
    gcloud_tpu scp "$archive" "$TPU_NAME":dprl.tar.gz --worker=all
    on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf dprl.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m pip install -q -U pip && \
      python3 -m pip install -q -U '$JAX_PACKAGE' && python3 -m pip install -q -e ."
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    printf -v cmd '%q ' "$@"
    cmd=${cmd% }
    # setsid + nohup: the run outlives the ssh session; its process group id is saved so
    # `stop` ends exactly this run.
    on_all_workers "cd $REMOTE_DIR && setsid nohup bash -c $(printf '%q' "$cmd") \
      > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
    exec "$0" logs
    ;;
  logs)
    gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" --command="tail -n +1 -F $REMOTE_LOG"
    ;;
  stop)
    on_all_workers "if [ -f $REMOTE_PID ]; then kill -- -\$(cat $REMOTE_PID) 2>/dev/null || true; rm -f $REMOTE_PID; fi"
    ;;
  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    usage
    ;;
esac
