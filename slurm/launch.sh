# What both sbatch scripts run, sourced by slurm/sbatch_run.sh and mingpt/slurm/sbatch_run.sh:
#
#   launch_training SCRIPT [ARGS...]
#
# runs SCRIPT (a path from the repository root) with ARGS under one torchrun per node of the job,
# and requeues the job when Slurm warns of its time limit (ON_WARNING, below). The caller sets
# SNAPSHOT_PATH and passes it in ARGS. See slurm/README.md. slurm/preflight.sh uses find_rendezvous alone.

fail() {
    echo "error: $*" >&2
    exit 1
}

# Sets head_node and head_addr, where torchrun's rendezvous is, RDZV_PORT and NPROC_PER_NODE.
find_rendezvous() {
    # The first node hosts the rendezvous. This script runs there, so this is how that node resolves
    # its own name: torchrun on it then recognises the address as its own. One address, IPv4.
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
    head_addr=$(getent ahostsv4 "$head_node" | awk 'NR == 1 {print $1}') || fail "cannot resolve the first node, $head_node"
    # Two jobs whose first node is the same need different ports: derive it from the job id (below
    # 32768, where Linux picks the ports of outgoing connections).
    RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    # Nodes are alike (--nodes with per-node options): what the first node got, every node got.
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$SLURM_CPUS_ON_NODE}}
}

launch_training() {
    local script="$SLURM_SUBMIT_DIR/$1"
    shift
    [ -f "$script" ] || fail "$script not found; submit from the repository root"
    find_rendezvous
    # Restarted workers can hang on torchrun's shared rendezvous store (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

    # Slurm's warning before the time limit (--signal=B:USR1@...) comes to this shell alone. Either way
    # the job goes back to the queue and, when it runs again (same job id), resumes from its snapshot.
    # ON_WARNING=requeue (multinode.py): requeue at once; Slurm stops the running job (SIGTERM), which
    #   loses the epochs since its last snapshot, as the time limit would.
    # ON_WARNING=stop (the capstone): pass the warning on to the training processes (scancel signals the
    #   job's steps, not this shell); they agree to stop after the same step, save a snapshot there and
    #   exit 0; then requeue.
    warned=0
    on_warning() {
        warned=1
        if [ "${ON_WARNING:-requeue}" = stop ]; then
            echo "SIGUSR1: the training stops after this step, with a snapshot, and the job is requeued"
            scancel --signal=USR1 "$SLURM_JOB_ID"
        else
            echo "SIGUSR1: the job is requeued now; it resumes from $SNAPSHOT_PATH"
            scontrol requeue "$SLURM_JOB_ID"
        fi
    }
    trap on_warning USR1

    echo "$SLURM_NNODES nodes x $NPROC_PER_NODE processes, rendezvous at $head_addr:$RDZV_PORT ($head_node), snapshot $SNAPSHOT_PATH"
    # torchrun dies of SIGUSR1, so the bash before it ignores it (an ignored signal stays ignored
    # through exec); its workers inherit that, and the training script sets its own handler.
    srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1 && exec "$@"' ignore-usr1 \
        torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" --max-restarts=3 \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_addr:$RDZV_PORT" \
        "$script" "$@" &
    step=$!
    # srun runs in the background so that the trap runs as soon as the warning comes (bash defers
    # traps until a foreground command ends). `wait` then returns early: wait until the step ends.
    status=0
    wait "$step" || status=$?
    while kill -0 "$step" 2>/dev/null; do
        status=0
        wait "$step" || status=$?
    done

    if [ "$warned" = 1 ] && [ "${ON_WARNING:-requeue}" = stop ]; then
        echo "Requeueing job $SLURM_JOB_ID: it resumes from $SNAPSHOT_PATH"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status"
}
