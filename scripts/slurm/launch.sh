#!/usr/bin/env bash
# Multi-node cpt training under SLURM: one task per node, each running `accelerate launch` for the GPUs
# of its node; node 0 of the allocation hosts the rendezvous. Checkpoints, metrics and the final model
# are written by the main process (global rank 0) only; run.output_dir must be on a filesystem all
# nodes share (every rank writes its own RNG and, with ZeRO/FSDP, optimizer shards into a checkpoint).
#
# One command for the first start and every requeue: `cpt train` gets `--resume auto` (continue from the
# latest checkpoint in run.output_dir; start fresh where it holds none; refuse a directory that holds
# something else), unless the arguments carry a --resume of their own (`--resume`: a checkpoint must exist).
#   sbatch --nodes 2 --time 24:00:00 scripts/slurm/launch.sh recipes/paper/rewarm-de.yaml
#   sbatch --nodes 4 scripts/slurm/launch.sh recipes/paper/rewarm-de.yaml train.micro_batch_size=4
# Arguments after the script go to `cpt train` unchanged.
#
# Time limit and preemption (the #SBATCH lines below):
#   --signal=B:USR1@120  120 s (give or take SLURM's 60 s polling) before the time limit, SLURM sends USR1 to
#                        this script only (B:). It forwards USR1 to the job step (srun passes USR1 on to every
#                        task as it is), every rank checkpoints at the same step and stops, and the script
#                        requeues the job (scontrol requeue): the requeued job runs this same line and resumes.
#                        Give more than 120 s where a step plus a checkpoint save takes longer.
#   --requeue            the job may be requeued: by the script as above, and by SLURM on preemption where the
#                        partition has PreemptMode=REQUEUE. A preemption sends SIGTERM, which srun answers by
#                        killing its tasks: only with PreemptParameters=send_user_signal (slurm.conf) does the
#                        USR1 come first, and the run checkpoints; otherwise it resumes from its last checkpoint.
#   --open-mode=append   a requeued job (same job id, same log file) appends to its log instead of truncating it.
# By hand: `scancel --batch --signal=USR1 JOBID` checkpoints and requeues now; `scancel --signal=USR1 JOBID`
# (the job step only) checkpoints and ends the job.
#
# Environment:
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT        rendezvous port on the first node (default 29500)
#   ACCELERATE_CONFIG  an accelerate config, e.g. recipes/accelerate/fsdp2.yaml (default: plain DDP,
#                      --multi_gpu). DeepSpeed is set in the recipe (train.deepspeed), not here.
#   CPT_SRUN_ARGS      more srun options, split at spaces, e.g. a container with pyxis:
#                      CPT_SRUN_ARGS="--container-image=/shared/cpt.sqsh --container-mounts=/shared/cpt:/work/shared"
#   CPT_LAUNCH_PREFIX  a command that runs accelerate on each node, split at spaces, e.g. Apptainer:
#                      CPT_LAUNCH_PREFIX="apptainer exec --nv --bind /shared/cpt:/work/shared /shared/cpt.sif"
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds accelerate's launcher (torchrun) waits for its workers after a signal
#                      before it kills them (torch's default 30; here 300): a step plus a checkpoint save
#   CPT_DRY_RUN=1      print the command each node would run (with this shell's SLURM_NODEID, else 0), run nothing
# Every other rank of the run gets the signal too: torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to
# its workers, and SIGUSR1 only where PET_SIGNALS_TO_HANDLE names it, which this script sets; without it,
# USR1 would kill the launcher and leave its workers orphaned.
#SBATCH --job-name=cpt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch --nodes N $0 RECIPE [key.path=value ...] [cpt train options]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (run it with sbatch, or salloc then bash)}"

# The first host of the allocation, e.g. gpu[001-004] -> gpu001: scontrol expands SLURM's host ranges.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#hosts[@]} -gt 0 ]] || { echo "$0: scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host" >&2; exit 2; }
MAIN_IP=${hosts[0]}
NNODES=${SLURM_NNODES:-${#hosts[@]}}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}
# torchrun (inside accelerate launch) passes these signals on to its workers; its default list lacks SIGUSR1
PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
read -r -a launch_prefix <<< "${CPT_LAUNCH_PREFIX:-}"
read -r -a srun_extra <<< "${CPT_SRUN_ARGS:-}"

args=("$@")
resume_given=0
for a in "${args[@]}"; do
  if [[ "$a" == --resume || "$a" == --resume=* ]]; then resume_given=1; fi
done
if [[ $resume_given == 0 ]]; then args+=(--resume auto); fi

# The command of node $1 (its machine rank), into the array named by the caller: cmd.
node_command() {
  local dist=(--multi_gpu)
  if [[ -n "$ACCELERATE_CONFIG" ]]; then dist=(--config_file "$ACCELERATE_CONFIG"); fi
  local rank=$1
  shift
  cmd=("${launch_prefix[@]}" accelerate launch
    --num_machines "$NNODES" --machine_rank "$rank"
    --main_process_ip "$MAIN_IP" --main_process_port "$MASTER_PORT"
    --num_processes "$((NNODES * GPUS_PER_NODE))"
    "${dist[@]}"
    -m cpt.cli train "$@")
}

# `wait` for pid $1 until it has ended, however many trapped signals interrupt it; its exit status in $rc.
wait_for() {
  local pid=$1 again
  while :; do
    interrupted=0
    wait "$pid" && rc=0 || rc=$?
    if [[ $interrupted == 0 ]]; then return; fi
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    # ended: collect its status, unless the interrupted wait already did (then wait answers 127)
    wait "$pid" 2>/dev/null && again=0 || again=$?
    if [[ $again != 127 ]]; then rc=$again; fi
    return
  done
}

# Runs on every node as its own srun task (SLURM_NODEID: that node's index, its machine rank). The node's
# shell stays as the parent of accelerate instead of exec-ing it: a run stopped by a signal (checkpointed)
# exits 128 + signal, and srun --kill-on-bad-exit would kill the nodes still finishing their exit; the
# shell reports it and exits 0. The signals themselves reach accelerate directly: SLURM signals every
# process of the job step (srun's forwarded USR1, and SIGTERM at preemption or the time limit).
# shellcheck disable=SC2329  # invoked in the node's script (declare -f below)
node_main() {
  local cmd rc interrupted
  node_command "${SLURM_NODEID:?srun sets SLURM_NODEID in each task}" "$@"
  export PET_SIGNALS_TO_HANDLE TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  trap 'interrupted=1' USR1 TERM INT HUP
  "${cmd[@]}" &
  wait_for $!
  case $rc in
    130 | 138 | 143)
      echo "cpt-launch: node $SLURM_NODEID: stopped by signal $((rc - 128)) after a checkpoint (exit $rc)" >&2
      exit 0 ;;
  esac
  exit "$rc"
}

if [[ "${CPT_DRY_RUN:-0}" == 1 ]]; then
  srun_text=""
  for a in "${srun_extra[@]}"; do srun_text+=" $a"; done
  echo "# srun --ntasks-per-node=1 --nodes=$NNODES --kill-on-bad-exit=1$srun_text runs on each node" \
    "(node ${SLURM_NODEID:-0} shown), with PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" \
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT:"
  node_command "${SLURM_NODEID:-0}" "${args[@]}"
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi

echo "cpt-launch: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s), main $MAIN_IP:$MASTER_PORT" >&2
# The node's script is sent whole (the functions and the values they read), not through exported
# functions or the environment, so that it runs the same inside a container (CPT_SRUN_ARGS).
node_script="set -euo pipefail
$(declare -p NNODES MAIN_IP MASTER_PORT GPUS_PER_NODE ACCELERATE_CONFIG PET_SIGNALS_TO_HANDLE \
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT launch_prefix)
$(declare -f node_command wait_for node_main)
node_main \"\$@\""

requeue=0
forwarded=0
interrupted=0
srun_pid=
on_usr1() {  # the time-limit warning (--signal=B:USR1@...), or scancel --batch --signal=USR1
  interrupted=1
  requeue=1
  if [[ $forwarded == 0 && -n $srun_pid ]]; then  # once: a second USR1 would cut torchrun's wait for its workers
    forwarded=1
    echo "cpt-launch: SIGUSR1: every rank checkpoints and stops, then the job is requeued" >&2
    kill -USR1 "$srun_pid" 2>/dev/null || true
  fi
}
# shellcheck disable=SC2329  # invoked by the traps below
on_stop() {  # SIGTERM/SIGINT to this shell: SLURM signals the job step itself; srun kills its tasks on SIGTERM
  interrupted=1
  echo "cpt-launch: SIG$1 (not forwarded: SLURM signals the job step itself); waiting for the job step" >&2
}
trap on_usr1 USR1
trap 'on_stop TERM' TERM
trap 'on_stop INT' INT

# --kill-on-bad-exit: one node failing stops the others instead of leaving them waiting in a collective.
srun --ntasks-per-node=1 --nodes="$NNODES" --kill-on-bad-exit=1 "${srun_extra[@]}" \
  bash -c "$node_script" cpt-node "${args[@]}" &
srun_pid=$!
if [[ $requeue == 1 ]]; then on_usr1; fi  # a USR1 that came before srun started
wait_for "$srun_pid"
if [[ $requeue == 1 ]]; then
  echo "cpt-launch: job step ended (exit $rc); requeueing job ${SLURM_JOB_ID:-?}" >&2
  scontrol requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set: cannot requeue}"
fi
exit "$rc"
