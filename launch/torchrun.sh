#!/usr/bin/env bash
# Launch mtp_dist.train with torchrun on this node (or, with NNODES>1, one node of many).
# Usage: launch/torchrun.sh configs/small.yaml [dotted.key=value ...]
set -euo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank on CPU: ranks share cores

CONFIG=$1; shift
exec python -m torch.distributed.run --nproc-per-node="$NPROC_PER_NODE" --nnodes="$NNODES" \
    --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m mtp_dist.train --config "$CONFIG" "$@"
