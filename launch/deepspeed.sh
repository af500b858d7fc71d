#!/usr/bin/env bash
# Train with the DeepSpeed engine on one node: launch/deepspeed.sh NPROC CONFIG [key=value ...]
# e.g. launch/deepspeed.sh 2 configs/tiny.yaml deepspeed.zero_stage=2
#      launch/deepspeed.sh 8 configs/small.yaml deepspeed.zero_stage=3 deepspeed.config=configs/deepspeed/zero3.json
# The checks that need no process group run once first, so a mistake is one `error:` line.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 2 ] || fail "usage: launch/deepspeed.sh NPROC CONFIG [key=value ...] (e.g. 2 configs/tiny.yaml)"
NPROC=$1
CONFIG=$2
shift 2
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$NPROC is not a positive number of processes"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  # CPU: gloo ranks; one thread each or they fight over the cores.
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

python -m mtp_dist.train --check --world-size "$NPROC" --config "$CONFIG" engine=deepspeed "$@" >/dev/null
# --no_local_rank: mtp_dist.train reads LOCAL_RANK from the environment, not an argument.
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module mtp_dist.train --config "$CONFIG" engine=deepspeed "$@"
