#!/usr/bin/env bash
# `cpt prepare` on many machines: a SLURM job array, one task per part of the inputs, then one cheap merge.
# Task I of an array of N runs `cpt prepare FILES ... --num-shards N --shard-index I --out DIR/part-I`
# (contiguous ranges of the inputs' records, balanced by size: cpt/data/prepare.py, "the split rule");
# the merge writes DIR/manifest.json over the parts' shard files (relative paths, no token data copied),
# identical to one prepare of FILES. DIR must be on a filesystem every node sees; keep DIR/part-* there.
#   jid=$(sbatch --parsable --array=0-7 scripts/slurm/prepare_array.sh DIR FILES... --tokenizer TOK --seq-len 2048)
#   sbatch --dependency=afterok:$jid scripts/slurm/prepare_array.sh --merge DIR
# Arguments after DIR go to `cpt prepare` unchanged (e.g. --num-proc 16 to use a node's cores as well).
# N is the array's size (SLURM_ARRAY_TASK_COUNT): an array of 0-7 is 8 parts; the merge refuses a missing
# or extra part. A failed task can be rerun alone (sbatch --array=3 ... with the same N: set CPT_NUM_SHARDS=8).
# Environment:
#   CPT_NUM_SHARDS   the number of parts, where the array is not 0..N-1 in one submission
#   CPT_DRY_RUN=1    print the command this task would run (SLURM_ARRAY_TASK_ID, default 0), run nothing
#SBATCH --job-name=cpt-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
shopt -s extglob  # before the lines that use it are parsed

CPT=${CPT:-cpt}
DRY=${CPT_DRY_RUN:-0}
run() {
  if [[ "$DRY" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else exec "$@"; fi
}

if [[ "${1:-}" == --merge ]]; then
  [[ $# -eq 2 ]] || { echo "usage: sbatch --dependency=afterok:JOB $0 --merge DIR" >&2; exit 2; }
  shopt -s nullglob
  parts=("$2"/part-+([0-9]))  # not the part-I.tmp-PID@HOST a killed task leaves
  [[ ${#parts[@]} -gt 0 ]] || { echo "$0: no $2/part-* to merge" >&2; exit 2; }
  run "$CPT" prepare merge "${parts[@]}" --out "$2" --overwrite
  exit 0
fi

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch --array=0-(N-1) $0 DIR FILES... --tokenizer TOK --seq-len L [cpt prepare options]" >&2
  exit 2
fi
if [[ "$DRY" != 1 ]]; then
  : "${SLURM_ARRAY_TASK_ID:?not a task of a SLURM job array (sbatch --array=0-(N-1) ...)}"
fi
index=${SLURM_ARRAY_TASK_ID:-0}
count=${CPT_NUM_SHARDS:-${SLURM_ARRAY_TASK_COUNT:-1}}
dir=$1
shift
# --overwrite: a rerun of a failed or killed task replaces its part (a killed one leaves only a temporary)
run "$CPT" prepare "$@" --num-shards "$count" --shard-index "$index" --out "$dir/part-$index" --overwrite
