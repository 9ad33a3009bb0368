#!/usr/bin/env bash
# Multi-node cpt training under SLURM: one task per node, each running `accelerate launch` for the GPUs
# of its node; node 0 of the allocation hosts the rendezvous. Checkpoints, metrics and the final model
# are written by the main process (global rank 0) only; run.output_dir must be on a filesystem all
# nodes share (every rank writes its own RNG and, with ZeRO/FSDP, optimizer shards into a checkpoint).
#   sbatch --nodes 2 scripts/slurm/launch.sh recipes/paper/rewarm-de.yaml
#   sbatch --nodes 4 scripts/slurm/launch.sh recipes/paper/rewarm-de.yaml train.micro_batch_size=4 --resume
# Arguments after the script go to `cpt train` unchanged. Environment:
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT        rendezvous port on the first node (default 29500)
#   ACCELERATE_CONFIG  an accelerate config, e.g. recipes/accelerate/fsdp2.yaml (default: plain DDP,
#                      --multi_gpu). DeepSpeed is set in the recipe (train.deepspeed), not here.
#   CPT_DRY_RUN=1      print the command each node would run (with this shell's SLURM_NODEID), run nothing
#SBATCH --job-name=cpt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch --nodes N $0 RECIPE [key.path=value ...] [cpt train options]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (run it with sbatch, or salloc then bash)}"
: "${SLURM_NNODES:?SLURM_NNODES is not set}"

# The first host of the allocation, e.g. gpu[001-004] -> gpu001: scontrol expands SLURM's host ranges.
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_IP
export MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}
export CPT_DRY_RUN=${CPT_DRY_RUN:-0}

# Runs on every node as its own srun task: SLURM_NODEID is that node's index, i.e. its machine rank.
launch_node() {
  local dist=(--multi_gpu)
  if [[ -n "$ACCELERATE_CONFIG" ]]; then dist=(--config_file "$ACCELERATE_CONFIG"); fi
  local cmd=(accelerate launch
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"
    --main_process_ip "$MAIN_IP" --main_process_port "$MASTER_PORT"
    --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
    "${dist[@]}"
    -m cpt.cli train "$@")
  if [[ "$CPT_DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
  else
    exec "${cmd[@]}"
  fi
}
export -f launch_node

if [[ "$CPT_DRY_RUN" == 1 ]]; then
  echo "# srun --ntasks-per-node=1 --nodes $SLURM_NNODES runs on each node (node $SLURM_NODEID shown):"
  SLURM_NODEID=${SLURM_NODEID:-0} launch_node "$@"
  exit 0
fi
# --kill-on-bad-exit: one node failing stops the others instead of leaving them waiting in a collective.
srun --ntasks-per-node=1 --nodes "$SLURM_NNODES" --kill-on-bad-exit=1 bash -c 'launch_node "$@"' cpt-node "$@"
