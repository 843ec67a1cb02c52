#!/bin/bash
# Step 5: multinode.py on every node of a Slurm job, one torchrun per node (see slurm/README.md).
#
#   sbatch slurm/sbatch_run.sh              # from the repository root: multinode.py 50 10
#   sbatch slurm/sbatch_run.sh 200 20       # anything after the script name goes to multinode.py
#
# ---- Edit for your cluster: what the job asks for (sbatch options on the command line win) ----
#SBATCH --job-name=ddp-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1             # one torchrun per node: it starts the training processes
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out        # in the job's working directory; %j is the job id
#SBATCH --open-mode=append              # a requeued job writes on in the same file
#SBATCH --signal=B:USR1@120             # warn this script 120 s before the time limit: it requeues the job
#SBATCH --requeue                       # the job may go back to the queue, and then resumes
##SBATCH --partition=gpu                # a GPU cluster: remove one '#' from these and edit them
##SBATCH --gpus-per-node=4
##SBATCH --cpus-per-task=16
#
# Environment variables, all optional (e.g. NPROC_PER_NODE=2 sbatch slurm/sbatch_run.sh):
#   NPROC_PER_NODE  training processes per node; default: the GPUs Slurm gave the node, else its CPUs
#   RDZV_PORT       rendezvous port on the first node; default: 20000 + job id % 10000
#   SNAPSHOT_PATH   snapshot file on storage every node reaches; default: snapshot-<job id>.pt in
#                   the job's working directory. Point it at an earlier job's file to resume that run.
set -euo pipefail

# ---- Edit for your cluster: the software environment ----
# module load cuda
# source "$HOME/venvs/ddp/bin/activate"

usage="submit from the repository root: sbatch slurm/sbatch_run.sh"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "error: not in a Slurm job; $usage" >&2; exit 1; }
# Slurm runs a copy of this file from its spool folder: find the code from where sbatch was run.
launcher="$SLURM_SUBMIT_DIR/slurm/launch.sh"
[ -f "$launcher" ] || { echo "error: $launcher not found; $usage" >&2; exit 1; }
# shellcheck source=slurm/launch.sh
source "$launcher"

[ "$#" -gt 0 ] || set -- 50 10
SNAPSHOT_PATH=${SNAPSHOT_PATH:-$PWD/snapshot-$SLURM_JOB_ID.pt}
launch_training multinode.py --snapshot_path "$SNAPSHOT_PATH" "$@"
