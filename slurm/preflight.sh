#!/bin/bash
# tools/preflight.py on the nodes a job gets, started as slurm/sbatch_run.sh starts the training: one
# torchrun per node, meeting at the first node. Ask for what the training job will ask for:
#
#   sbatch slurm/preflight.sh                          # from the repository root: 2 nodes
#   sbatch --nodes=4 --gpus-per-node=8 slurm/preflight.sh --timeout 60
#
# Its report is in slurm-ddp-preflight-<job id>.out; the job fails when preflight found a problem.
#SBATCH --job-name=ddp-preflight
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1             # one torchrun per node: it starts the processes
#SBATCH --time=00:05:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage="submit from the repository root: sbatch slurm/preflight.sh"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "error: not in a Slurm job; $usage" >&2; exit 1; }
launcher="$SLURM_SUBMIT_DIR/slurm/launch.sh"
[ -f "$launcher" ] || { echo "error: $launcher not found; $usage" >&2; exit 1; }
# shellcheck source=slurm/launch.sh
source "$launcher"

find_rendezvous
echo "$SLURM_NNODES nodes x $NPROC_PER_NODE processes, rendezvous at $head_addr:$RDZV_PORT ($head_node)"
# No --max-restarts: a problem is the answer, not a reason to try again.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_addr:$RDZV_PORT" \
    "$SLURM_SUBMIT_DIR/tools/preflight.py" "$@"
