#!/usr/bin/env bash
# Multi-host TPU VM pod (e.g. v4-32 = 4 hosts): the same command on every
# worker; jax.distributed initialises itself from the TPU environment.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
# CONFIG is FILE.py[:ARG] relative to the repository on the workers.
# WORKDIR must be visible to every host with the same path (gs://BUCKET/run
# or a shared filesystem): checkpoints are written by all processes together,
# report/metrics files by process 0.
# Environment: REPO_DIR (repository on the workers, default ~/edgevl_jax),
# PYTHON (default python3), GCLOUD_FLAGS (extra gcloud flags, e.g.
# "--project=P --internal-ip"). Copy the repository to the workers first, e.g.
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=ZONE . \
#     TPU_NAME:~/edgevl_jax
set -euo pipefail
if [ "$#" -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4
repo=${REPO_DIR:-'~/edgevl_jax'}
python=${PYTHON:-python3}
# Quote every argument for the remote shell; the repository path keeps its
# unquoted ~ so it expands on the worker.
remote="cd $repo && exec $(printf '%q' "$python") -m edgevl_jax.main"
remote+=" --jax_distributed=auto"
remote+=" $(printf '%q ' "--config=$config" "--workdir=$workdir" "$@")"
# shellcheck disable=SC2086  # GCLOUD_FLAGS is a list of flags on purpose.
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  ${GCLOUD_FLAGS:-} --command="$remote"
