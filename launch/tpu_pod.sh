#!/usr/bin/env bash
# Runs a dspark command on the workers of a Cloud TPU VM pod slice: one process per host, joined into one
# JAX runtime by `--distributed` (jax.distributed.initialize() finds the other hosts itself on Cloud TPU).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh setup
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh run dspark train --config configs/train/qwen3_8b_dspark.py \
#       --target /mnt/shared/Qwen3-8B --data_dir /mnt/shared/data --workdir /mnt/shared/runs/dspark \
#       --mesh data=32 --distributed
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh run dspark generate --target /mnt/shared/Qwen3-8B \
#       --drafter /mnt/shared/runs/dspark/drafter --prompts_file /mnt/shared/prompts.jsonl --batch_size 64 \
#       --mesh data=8,model=4 --distributed --output_json /mnt/shared/completions.json
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); WORKERS ("all" or a worker list such as
# "0" or "0,1"; default all); REMOTE_DIR (checkout location on the workers, relative to the home directory;
# default dspark-jax). Paths passed to dspark must exist on every worker (a shared filesystem, see README.md).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
WORKERS="${WORKERS:-all}"
REMOTE_DIR="${REMOTE_DIR:-dspark-jax}"
TPU=(--zone="$ZONE" --worker="$WORKERS" ${PROJECT:+--project="$PROJECT"})

case "${1:-}" in
  setup)  # copy this checkout (without .git and runs/) to every worker and install it with TPU JAX
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    tar -C "$repo" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$tmp/dspark-jax.tar.gz" .
    gcloud compute tpus tpu-vm scp "$tmp/dspark-jax.tar.gz" "$TPU_NAME":dspark-jax.tar.gz "${TPU[@]}"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --command="set -e; mkdir -p $REMOTE_DIR; \
      tar -xzf dspark-jax.tar.gz -C $REMOTE_DIR; pip install -q 'jax[tpu]>=0.10.2' -e $REMOTE_DIR"
    ;;
  run)  # the same command on every selected worker, from the checkout directory
    shift
    [ $# -gt 0 ] || { echo "usage: $0 run dspark <command> [--flags]" >&2; exit 2; }
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --command="cd $REMOTE_DIR && $(printf '%q ' "$@")"
    ;;
  *)
    echo "usage: $0 setup | run dspark <command> [--flags]   (env: TPU_NAME, ZONE, PROJECT, WORKERS, REMOTE_DIR)" >&2
    exit 2
    ;;
esac
