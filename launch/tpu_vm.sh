#!/usr/bin/env bash
# Run a jaxcollab experiment on a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR -- --config=configs/semi.py:llama3_8b_trace --config.model.path=...
#
# Creates the TPU VM NAME (e.g. ACCELERATOR=v5litepod-16) if it does not exist, copies this checkout to
# every worker, installs jaxcollab with the [tpu] extra and runs `python -m jaxcollab.launch` on all
# workers at once. JAX finds the other hosts of the slice by itself (jaxcollab calls
# jax.distributed.initialize when TPU_WORKER_HOSTNAMES names several hosts); only worker 0 writes the
# reports. Weights, TRACE data and the workdir must be on storage every worker sees at the same path
# (e.g. a GCS bucket mounted with gcsfuse, or a persistent disk on single-host slices).
#
# Environment: PROJECT (gcloud project, default: the configured one), RUNTIME (TPU software version,
# default v2-alpha-tpuv5-lite), WORKDIR (default runs/tpu), PYTHON (default python3).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3
shift 3
[[ ${1:-} == "--" ]] && shift
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
WORKDIR=${WORKDIR:-runs/tpu}
PYTHON=${PYTHON:-python3}
PROJECT_FLAG=()
[[ -n ${PROJECT:-} ]] && PROJECT_FLAG=(--project "$PROJECT")
HERE=$(cd "$(dirname "$0")/.." && pwd)

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" "${PROJECT_FLAG[@]}"
fi

tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxcollab.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxcollab.tgz "$NAME":~/jaxcollab.tgz --worker=all --zone "$ZONE" \
  "${PROJECT_FLAG[@]}"

printf -v ARGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone "$ZONE" "${PROJECT_FLAG[@]}" --command "
  set -e
  mkdir -p ~/jaxcollab && tar -xzf ~/jaxcollab.tgz -C ~/jaxcollab && cd ~/jaxcollab
  $PYTHON -m pip install -q -e '.[tpu]'
  $PYTHON -m jaxcollab.launch --workdir=$WORKDIR $ARGS
"
