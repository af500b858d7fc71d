#!/usr/bin/env bash
# Train with the DeepSpeed engine on one node: launch/deepspeed.sh NPROC CONFIG [key=value ...]
# e.g. launch/deepspeed.sh 2 configs/tiny.yaml deepspeed.zero_stage=2
#      launch/deepspeed.sh 8 configs/small.yaml deepspeed.zero_stage=3 deepspeed.config=configs/deepspeed/zero3.json
set -euo pipefail
NPROC=${1:?usage: launch/deepspeed.sh NPROC CONFIG [key=value ...]}
CONFIG=${2:?usage: launch/deepspeed.sh NPROC CONFIG [key=value ...]}
shift 2

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  # CPU: gloo ranks; one thread each or they fight over the cores.
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# --no_local_rank: mtp_dist.train reads LOCAL_RANK from the environment, not an argument.
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module mtp_dist.train --config "$CONFIG" engine=deepspeed "$@"
