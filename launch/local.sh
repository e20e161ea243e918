#!/usr/bin/env bash
# One host, any devices (CPU, one or more GPUs, a TPU VM):
#   launch/local.sh CONFIG WORKDIR [extra flags, e.g. --config.num_steps=100]
# CONFIG is FILE.py[:ARG]. Re-running with the same WORKDIR resumes.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
exec "$python" -m edgevl_jax.main --config="$config" --workdir="$workdir" "$@"
