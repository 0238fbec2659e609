#!/usr/bin/env bash
# Runs once per task under `srun` (one task per GPU, or per CPU rank): exports the
# torch.distributed environment from Slurm's task ids, then execs the given command.
#
#   srun ... slurm/lib/srun_task.sh python -m megatron_dgrpo.cli train --config run.yaml
#
# Needs MASTER_ADDR and MASTER_PORT (set by slurm/lib/common.sh). The command is exec'd, so
# signals that srun forwards (USR1, TERM) reach the trainer itself.
set -euo pipefail

: "${SLURM_PROCID:?run this under srun}"
: "${MASTER_ADDR:?MASTER_ADDR is not set (source slurm/lib/common.sh in the batch script)}"
: "${MASTER_PORT:?MASTER_PORT is not set (source slurm/lib/common.sh in the batch script)}"
if [[ $# -eq 0 ]]; then
    echo "usage: srun_task.sh COMMAND [ARGS...]" >&2
    exit 2
fi

export RANK="$SLURM_PROCID"
export WORLD_SIZE="$SLURM_NTASKS"
export LOCAL_RANK="$SLURM_LOCALID"
export GROUP_RANK="$SLURM_NODEID"
exec "$@"
