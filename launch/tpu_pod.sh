#!/usr/bin/env bash
# ProSona on a Cloud TPU VM pod slice: one Python process per TPU host, every host running
# the same `python -m prosona_jax.main` (JAX multi-controller). See launch/README.md.
#
#   export TPU_PROJECT=my-project TPU_ZONE=us-central2-b TPU_TYPE=v4-32 TPU_NAME=prosona
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh copy [DATA_FILE ...]   # code to ~/prosona_jax, data files to ~/data
#   launch/tpu_pod.sh setup                  # venv with jax[tpu], requirements, gcsfs
#   launch/tpu_pod.sh run --config=configs/lidc.py --workdir=gs://BUCKET/runs/lidc \
#       --config.data.path=/home/$USER/data/lidc_attributes.pkl
#   launch/tpu_pod.sh stop                   # SIGTERM: checkpoint on every host, exit
#   launch/tpu_pod.sh delete
#
# Environment: TPU_PROJECT (default: gcloud's project), TPU_ZONE, TPU_TYPE (accelerator
# type), TPU_NAME, TPU_VERSION (runtime image), TPU_SPOT=1 (spot capacity), TPU_DETACH=1
# (`run` returns at once; output in ~/prosona_run.log on each host), TPU_DRY_RUN=1 (print
# the gcloud commands instead of running them).
set -euo pipefail

PROJECT=${TPU_PROJECT:-}
ZONE=${TPU_ZONE:-us-central2-b}
TYPE=${TPU_TYPE:-v4-32}
NAME=${TPU_NAME:-prosona}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=prosona_jax  # Relative to the home directory on every host.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

gc() {
  # gcloud with the project flag when one is set; printed instead under TPU_DRY_RUN=1.
  local args=(gcloud "$@")
  if [[ -n "$PROJECT" ]]; then
    args+=(--project="$PROJECT")
  fi
  if [[ "${TPU_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${args[@]}"
    echo
  else
    "${args[@]}"
  fi
}

on_all_workers() {
  gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create)
    spot=()
    if [[ "${TPU_SPOT:-0}" == 1 ]]; then
      spot=(--spot)
    fi
    gc compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
      --version="$VERSION" "${spot[@]}"
    ;;
  copy)
    # A tarball of the code (no .venv, .git or runs), unpacked on every host.
    tarball=$(mktemp -t prosona_src.XXXXXX.tgz)
    trap 'rm -f "$tarball"' EXIT
    tar -C "$REPO" -czf "$tarball" prosona_jax configs launch requirements.txt pyproject.toml
    gc compute tpus tpu-vm scp "$tarball" "$NAME:prosona_src.tgz" --zone="$ZONE" --worker=all
    on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/prosona_src.tgz -C ~/$REMOTE_DIR"
    if (($#)); then
      on_all_workers "mkdir -p ~/data"
      gc compute tpus tpu-vm scp "$@" "$NAME:data/" --zone="$ZONE" --worker=all --recurse
    fi
    ;;
  setup)
    on_all_workers "set -e; cd ~/$REMOTE_DIR
      (python3 -m venv .venv 2>/dev/null) || { sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv .venv; }
      . .venv/bin/activate
      pip install -q --upgrade pip
      pip install -q -r requirements.txt 'jax[tpu]' gcsfs
      python -c 'import jax; print(jax.device_count(), jax.local_devices())'"
    ;;
  run)
    # Every host runs the same command; `--distributed` makes each call
    # jax.distributed.initialize(), which finds the others from the TPU metadata.
    quoted=$(printf "%q " "$@")
    main="cd ~/$REMOTE_DIR && . .venv/bin/activate && exec python -m prosona_jax.main --distributed $quoted"
    if [[ "${TPU_DETACH:-0}" == 1 ]]; then
      on_all_workers "nohup bash -c $(printf '%q' "$main") > ~/prosona_run.log 2>&1 < /dev/null & echo \$! > ~/prosona_run.pid"
    else
      on_all_workers "$main"
    fi
    ;;
  logs)
    gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="${1:-0}" \
      --command="tail -n 50 ~/prosona_run.log"
    ;;
  stop)
    # Only the run started by `run` with TPU_DETACH=1 (its pid file); JAX's preemption
    # service turns SIGTERM into a checkpoint at the same step on every host.
    on_all_workers "test -f ~/prosona_run.pid && kill -TERM \$(cat ~/prosona_run.pid) || true"
    ;;
  delete)
    gc compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
    ;;
  help | -h | --help)
    usage 0
    ;;
  *)
    echo "unknown command: $cmd" >&2
    usage 2
    ;;
esac
