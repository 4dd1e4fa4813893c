#!/usr/bin/env bash
# Run a jaxcollab experiment on CUDA GPUs: one node, or several nodes with one process per node.
#
#   launch/gpu.sh -- --config=configs/semi.py:llama3_8b_trace --config.model.path=/models/Meta-Llama-3-8B \
#       --config.data.trace_root=/data/TRACE --config.data.metamath_file=/data/MetaMathQA-395K.json
#
# One node: run as above; the mesh uses every local GPU (fsdp=-1 by default).
# Several nodes: run the same command on every node with
#   NUM_NODES=4 NODE_RANK=<0..3> COORDINATOR=<host of node 0>:<port>
# (under SLURM, `srun launch/gpu.sh -- ...` sets these from SLURM_* itself). The processes form one JAX
# runtime (jax.distributed), the mesh spans all GPUs of all nodes, and only rank 0 writes the reports.
# Weights, data and the workdir must be on a filesystem every node sees at the same path.
#
# Environment: WORKDIR (default runs/gpu), PYTHON (default python3), INSTALL=1 to pip install the
# [cuda] extra first.
set -euo pipefail

[[ ${1:-} == "--" ]] && shift
WORKDIR=${WORKDIR:-runs/gpu}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [[ ${INSTALL:-0} == 1 ]]; then
  "$PYTHON" -m pip install -q -e '.[cuda]'
fi

if [[ -n ${SLURM_NTASKS:-} && ${SLURM_NTASKS} -gt 1 ]]; then
  NUM_NODES=${NUM_NODES:-$SLURM_NTASKS}
  NODE_RANK=${NODE_RANK:-$SLURM_PROCID}
  if [[ -z ${COORDINATOR:-} ]]; then
    FIRST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    COORDINATOR="$FIRST:12345"
  fi
fi

if [[ ${NUM_NODES:-1} -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1)}" "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK
fi

# Let XLA use most of the GPU memory for the model and keep latency-hiding scheduling on.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$PYTHON" -m jaxcollab.launch --workdir="$WORKDIR" "$@"
