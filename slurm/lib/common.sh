# Shared by the slurm/*.sbatch scripts (source it; it defines functions and sets nothing else).
#
#   source "$DGRPO_HOME/slurm/lib/common.sh"
#   dgrpo_rendezvous                       # MASTER_ADDR / MASTER_PORT for torch.distributed
#   dgrpo_job_dir "$RUN_DIR"               # RUN_DIR/slurm/JOBID-rRESTART/: env + command record
#   dgrpo_run_requeueable srun ... slurm/lib/srun_task.sh python -m megatron_dgrpo.cli train ...
#
# Pre-emption flow: `#SBATCH --signal=B:USR1@120` signals the batch shell only, so
# dgrpo_run_requeueable runs the step in the background, forwards USR1/TERM to srun (which
# forwards them to every task), waits, and when the trainer exits with DGRPO_REQUEUE_EXIT_CODE
# ("saved after the current step") calls `scontrol requeue $SLURM_JOB_ID`. The restarted job
# resumes from RUN_DIR/checkpoints/latest by itself.

# Must equal megatron_dgrpo.train.runner.REQUEUE_EXIT_CODE (a test checks it).
DGRPO_REQUEUE_EXIT_CODE=3

dgrpo_log() {
    echo "[dgrpo-slurm $(date -u +%H:%M:%S)] $*"
}

# MASTER_ADDR: the first node of the allocation (override by exporting MASTER_ADDR);
# MASTER_PORT: derived from the job id so two jobs sharing a node do not collide.
dgrpo_rendezvous() {
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    fi
    export MASTER_ADDR
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
}

# Per-job record under the run directory; prints the directory.
dgrpo_job_dir() {
    local run_dir="$1"
    local dir="$run_dir/slurm/${SLURM_JOB_ID}-r${SLURM_RESTART_COUNT:-0}"
    mkdir -p "$dir"
    env | grep -E '^(SLURM_|MASTER_|NCCL_|CUDA_|TORCH_|CONTAINER_|DGRPO_)' | sort > "$dir/env.txt"
    echo "$dir"
}

# Run a command (normally srun ...) so that USR1/TERM sent to the batch shell reach it, and
# requeue the job when it exits with DGRPO_REQUEUE_EXIT_CODE. Returns the command's exit code
# (0 after a requeue: the job continues in its next incarnation).
dgrpo_run_requeueable() {
    local pid rc
    "$@" &
    pid=$!
    # shellcheck disable=SC2064  # expand pid now
    trap "dgrpo_log 'USR1 received: asking the trainer to save and stop'; kill -USR1 $pid 2>/dev/null || true" USR1
    # shellcheck disable=SC2064
    trap "dgrpo_log 'TERM received: forwarding'; kill -TERM $pid 2>/dev/null || true" TERM
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # A trap interrupts `wait` while the command still runs: wait again.
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [[ $rc -eq $DGRPO_REQUEUE_EXIT_CODE ]]; then
        if [[ "${DGRPO_REQUEUE:-1}" == 1 ]]; then
            dgrpo_log "trainer saved on a signal: requeueing job $SLURM_JOB_ID"
            if scontrol requeue "$SLURM_JOB_ID"; then
                return 0
            fi
            dgrpo_log "scontrol requeue failed (job cancelled, or not requeueable); resubmit to resume"
        else
            dgrpo_log "trainer saved on a signal; DGRPO_REQUEUE=0, not requeueing (resubmit to resume)"
        fi
    fi
    return "$rc"
}
