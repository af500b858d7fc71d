#!/usr/bin/env bash
# Train with the DeepSpeed engine through DeepSpeed's launcher.
#   launch/deepspeed.sh NPROC_PER_NODE CONFIG [key=value ...]
#   e.g. launch/deepspeed.sh 2 configs/tiny.yaml deepspeed.zero_stage=2
#        launch/deepspeed.sh 8 configs/small.yaml deepspeed.zero_stage=3 deepspeed.config=configs/deepspeed/zero3.json
# One node: the launcher starts NPROC_PER_NODE local ranks.
# Several nodes, inside a SLURM allocation (sbatch/salloc --nodes=N): DeepSpeed's
# `--launcher slurm` starts the ranks with srun from a hostfile made of the allocation's nodes
# (NPROC_PER_NODE slots each). This is the multi-node way that is tested. DeepSpeed's default
# multi-node launcher (pdsh with HOSTFILE=...) needs passwordless ssh between the nodes; it is
# passed through (set HOSTFILE) but not tested here. On SLURM, slurm/train.sbatch with
# engine=deepspeed needs no DeepSpeed launcher at all.
# The checks that need no process group run once first, so a mistake is one `error:` line.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 2 ] || fail "usage: launch/deepspeed.sh NPROC_PER_NODE CONFIG [key=value ...] (e.g. 2 configs/tiny.yaml)"
NPROC=$1
CONFIG=$2
shift 2
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || fail "NPROC_PER_NODE=$NPROC is not a positive number of processes"
if [ -n "${MASTER_PORT:-}" ]; then
  [[ $MASTER_PORT =~ ^[1-9][0-9]{0,4}$ ]] && [ "$MASTER_PORT" -le 65535 ] || fail "MASTER_PORT=$MASTER_PORT is not a port: give 1..65535"
fi
HERE=$(cd "$(dirname "$0")" && pwd)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  # CPU: gloo ranks; one thread each or they fight over the cores.
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
  # The ranks take their place from srun's SLURM_PROCID, not from variables the shell carries.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  NNODES=$SLURM_JOB_NUM_NODES
  export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  python -m mtp_dist.train --check --world-size $((NPROC * NNODES)) --config "$CONFIG" engine=deepspeed "$@"
  hostfile=$(mktemp)
  trap 'rm -f "$hostfile"' EXIT
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC/" >"$hostfile"
  echo "deepspeed --launcher slurm: $NNODES nodes x $NPROC processes, master $MASTER_ADDR:$MASTER_PORT"
  # No --num_gpus: the slurm launcher turns it into srun --gpus-per-node, which CPU nodes lack;
  # the hostfile's slots give the process count. The ranks read their place from SLURM's env.
  deepspeed --hostfile "$hostfile" --launcher slurm --launcher_args="--kill-on-bad-exit=1" \
    --no_ssh_check --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$HERE/train.py" --config "$CONFIG" engine=deepspeed "$@"
  exit $?
fi

if [ -n "${HOSTFILE:-}" ]; then  # pdsh over ssh: every node of the hostfile, NPROC each
  [ -f "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE does not exist: one line per node, 'HOST slots=N'"
  hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  [ "$hosts" -ge 1 ] || fail "HOSTFILE=$HOSTFILE names no node: one line per node, 'HOST slots=N'"
  python -m mtp_dist.train --check --world-size $((NPROC * hosts)) --config "$CONFIG" engine=deepspeed "$@" >/dev/null
  exec deepspeed --hostfile "$HOSTFILE" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module mtp_dist.train --config "$CONFIG" engine=deepspeed "$@"
fi
python -m mtp_dist.train --check --world-size "$NPROC" --config "$CONFIG" engine=deepspeed "$@" >/dev/null
# --no_local_rank: mtp_dist.train reads LOCAL_RANK from the environment, not an argument.
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module mtp_dist.train --config "$CONFIG" engine=deepspeed "$@"
