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
#SBATCH --signal=B:USR1@120             # warn this script 120 s before the time limit (more than an epoch)
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

fail() {
    echo "error: $*" >&2
    exit 1
}

[ -n "${SLURM_JOB_ID:-}" ] || fail "not in a Slurm job; submit from the repository root: sbatch slurm/sbatch_run.sh"
# Slurm runs a copy of this file from its spool folder: find the code from where sbatch was run.
script="$SLURM_SUBMIT_DIR/multinode.py"
[ -f "$script" ] || fail "$script not found; submit from the repository root: sbatch slurm/sbatch_run.sh"
[ "$#" -gt 0 ] || set -- 50 10

# The first node hosts the rendezvous. This script runs there, so this is how that node resolves
# its own name: torchrun on it then recognises the address as its own. One address, IPv4.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
head_addr=$(getent ahostsv4 "$head_node" | awk 'NR == 1 {print $1}') || fail "cannot resolve the first node, $head_node"
# Two jobs whose first node is the same need different ports: derive it from the job id (below
# 32768, where Linux picks the ports of outgoing connections).
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
# Nodes are alike (--nodes with per-node options): what the first node got, every node got.
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$SLURM_CPUS_ON_NODE}}
SNAPSHOT_PATH=${SNAPSHOT_PATH:-$PWD/snapshot-$SLURM_JOB_ID.pt}
# Restarted workers can hang on torchrun's shared rendezvous store (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# Slurm's warning before the time limit (--signal=B:USR1@...) comes to this shell alone. Pass it
# on to the training processes (scancel signals the job's steps, not this shell): they finish the
# epoch, save a snapshot and exit. Then requeue the job, to resume from that snapshot.
warned=0
on_warning() {
    warned=1
    echo "SIGUSR1: the training stops after this epoch, with a snapshot, and the job is requeued"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_warning USR1

echo "$SLURM_NNODES nodes x $NPROC_PER_NODE processes, rendezvous at $head_addr:$RDZV_PORT ($head_node), snapshot $SNAPSHOT_PATH"
# torchrun dies of SIGUSR1, so the bash before it ignores it (an ignored signal stays ignored
# through exec); its workers inherit that, and multinode.py sets its own handler.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1 && exec "$@"' ignore-usr1 \
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" --max-restarts=3 \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_addr:$RDZV_PORT" \
    "$script" --snapshot_path "$SNAPSHOT_PATH" "$@" &
step=$!
# srun runs in the background so that the trap runs as soon as the warning comes (bash defers
# traps until a foreground command ends). `wait` then returns early: wait until the step ends.
status=0
wait "$step" || status=$?
while kill -0 "$step" 2>/dev/null; do
    status=0
    wait "$step" || status=$?
done

if [ "$warned" = 1 ]; then
    echo "Requeueing job $SLURM_JOB_ID: it resumes from $SNAPSHOT_PATH"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
