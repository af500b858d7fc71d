#!/usr/bin/env bash
# Launch mtp_dist.train with torchrun on this node, or on each node of several (no SLURM needed).
# Usage: launch/torchrun.sh CONFIG [dotted.key=value ...]
# Several nodes: run it on every node with the same NNODES, MASTER_ADDR (the first node's
# address or name) and MASTER_PORT, and NODE_RANK=0..NNODES-1. The nodes meet at a c10d
# rendezvous hosted by torchrun on MASTER_ADDR; RDZV_ID names the run (default: the port), so a
# stale agent from another run cannot join. On many-NIC machines set GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME to the network the nodes share.
# The checks that need no process group run once first, so a mistake is one `error:` line.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] || fail "usage: launch/torchrun.sh CONFIG [dotted.key=value ...] (e.g. configs/tiny.yaml)"

NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank on CPU: ranks share cores
for v in NPROC_PER_NODE NNODES MASTER_PORT; do
    [[ ${!v} =~ ^[1-9][0-9]{0,5}$ ]] || fail "$v=${!v} is not a positive integer: set it to one"
done
[[ $NODE_RANK =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || fail "NODE_RANK=$NODE_RANK must be 0..$((NNODES - 1)) (NNODES=$NNODES)"
[ "$MASTER_PORT" -le 65535 ] || fail "MASTER_PORT=$MASTER_PORT is not a port: give 1..65535"
# Several nodes meet at MASTER_ADDR: a default of this host would leave the others waiting.
[ "$NNODES" = 1 ] || [ -n "${MASTER_ADDR:-}" ] || fail "NNODES=$NNODES needs MASTER_ADDR (the first node's address), the same on every node"
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

CONFIG=$1; shift
python -m mtp_dist.train --check --world-size $((NPROC_PER_NODE * NNODES)) --config "$CONFIG" "$@" >/dev/null
if [ "$NNODES" -gt 1 ]; then
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
                --rdzv-id="${RDZV_ID:-mtp-$MASTER_PORT}" --node-rank="$NODE_RANK")
else
    rendezvous=(--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
fi
exec python -m torch.distributed.run --nproc-per-node="$NPROC_PER_NODE" --nnodes="$NNODES" \
    "${rendezvous[@]}" -m mtp_dist.train --config "$CONFIG" "$@"
