#!/usr/bin/env bash
# The whole path on a cluster, as three chained jobs (each starts only if the one before it
# succeeded: --dependency=afterok; if one fails, the jobs after it are cancelled, not left
# pending forever: --kill-on-invalid-dep=yes):
#   1. train the tokenizer on the corpus           (slurm/tokenizer.sbatch)
#   2. tokenize the corpus, one array task per share (slurm/data_prep.sbatch)
#   3. pretrain                                     (slurm/train.sbatch)
# Usage: slurm/pipeline.sh CORPUS_GLOB OUT_DIR CONFIG [dotted.key=value ...]
#   e.g. slurm/pipeline.sh '/data/corpus/*.jsonl.zst' /scratch/run1 configs/small.yaml
# Settings from the environment: TASKS (array tasks, default 8), VOCAB_SIZE (default 32000),
# NODES (training nodes, default 1), SBATCH_ARGS (extra sbatch arguments for every job, e.g.
# "--partition=cpu --account=me"), TRAIN_SBATCH_ARGS (extra ones for training only, e.g.
# "--partition=gpu --gpus-per-node=8"). OUT_DIR gets tokenizer.model, shards/ and run/.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 3 ] || fail "usage: slurm/pipeline.sh CORPUS_GLOB OUT_DIR CONFIG [dotted.key=value ...]"
CORPUS=$1 OUT=$2 CONFIG=$3
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
TASKS=${TASKS:-8} VOCAB_SIZE=${VOCAB_SIZE:-32000} NODES=${NODES:-1}
for v in TASKS VOCAB_SIZE NODES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || fail "$v=${!v} is not a positive integer"
done
[ -f "$CONFIG" ] || fail "config $CONFIG does not exist: pass a YAML file such as configs/small.yaml"
# shellcheck disable=SC2086 # the glob is expanded here only to check it matches something
compgen -G "$CORPUS" >/dev/null || fail "CORPUS_GLOB '$CORPUS' matches no file: quote the glob, e.g. '/data/*.jsonl'"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
train_args=("$CONFIG" "data.paths=[$OUT/shards]" "data.tokenizer=$OUT/tokenizer.model"
            "model.vocab_size=$VOCAB_SIZE" "run.dir=$OUT/run" "$@")
# The training config and overrides, checked before any job is submitted: a typo is found now,
# not when the third job starts after the first two have run.
python -m mtp_dist.train --check-config --config "${train_args[@]}" || exit $?
read -r -a common <<<"${SBATCH_ARGS:-}"
read -r -a train_extra <<<"${TRAIN_SBATCH_ARGS:-}"

submitted=()
submit() {  # submit VAR SBATCH_ARGS...: the job id into VAR; a failure cancels the jobs before
    local id
    if ! id=$(sbatch --parsable "${@:2}"); then
        if [ ${#submitted[@]} -gt 0 ]; then
            scancel "${submitted[@]}" || true
            fail "sbatch failed (its message is above): cancelled the jobs already submitted (${submitted[*]}); fix it and rerun"
        fi
        fail "sbatch failed (its message is above): nothing was submitted"
    fi
    id=${id%%;*}
    submitted+=("$id")
    printf -v "$1" %s "$id"
}
submit tok "${common[@]}" "$HERE/tokenizer.sbatch" "$CORPUS" \
    --output "$OUT/tokenizer" --vocab-size "$VOCAB_SIZE"
submit shards "${common[@]}" --kill-on-invalid-dep=yes --dependency=afterok:"$tok" --array=0-$((TASKS - 1)) \
    "$HERE/data_prep.sbatch" "$CORPUS" --output-dir "$OUT/shards" --tokenizer "$OUT/tokenizer.model"
submit train "${common[@]}" "${train_extra[@]}" --kill-on-invalid-dep=yes --dependency=afterok:"$shards" \
    --nodes="$NODES" "$HERE/train.sbatch" "${train_args[@]}"

cat <<MSG
tokenizer job $tok -> tokenize array $shards (tasks 0-$((TASKS - 1))) -> training job $train
watch:   squeue -j $tok,$shards,$train        (or: squeue --me)
logs:    tail -f mtp-tokenizer-$tok.log  mtp-tokenize-${shards}_*.log  mtp-train-$train.log
shards:  python -m data_prep verify $OUT/shards
metrics: python -m mtp_dist.report $OUT/run
cancel:  scancel $tok $shards $train
MSG
