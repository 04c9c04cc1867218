#!/bin/bash
# Train on SLURM:  sbatch slurm/pretrain.sh model=1b parallel.tp=2 train.max_steps=20000
#
# Arguments are Hydra overrides, passed unchanged to `python -m launch launcher=slurm`, which
# starts one torchrun agent per node with srun (rendezvous on the first node) -- the same code path
# as `python -m launch launcher=slurm ...` from a login node, which submits this script.
# sbatch options on the command line override the #SBATCH lines below:
#   sbatch --nodes=4 --time=24:00:00 --partition=gpu -J my-run slurm/pretrain.sh model=7b parallel.tp=8
#
# Python: $PRETRAIN_PYTHON, else $VIRTUAL_ENV/bin/python (an activated venv, exported by sbatch),
# else python3 on PATH. The package must be installed there (`pip install -e .`).
# Output: <job name>-<job id>.out in the submission directory, appended to across requeues.
# Run directory: run.dir as configured; with no run.name/run.dir override it is
# runs/<job name>-<job id>: a requeued job keeps its id and resumes from its latest checkpoint, and
# another job never picks up this one's checkpoints. To continue a run in a new job, pass its
# run.dir (or run.name) explicitly.
#
# Preemption: SLURM sends SIGUSR1 to this script 120 s before the time limit (--signal), or you
# send it (`scancel --signal=USR1 --batch JOBID`). The script passes it to the training processes,
# which finish their step, save a checkpoint and exit 0, then requeues the job; the next run
# resumes from the checkpoint. SIGTERM (scancel, preemption by SLURM) also makes the workers save,
# within SLURM's KillWait/GraceTime, but does not requeue (SLURM requeues preempted jobs itself).
#
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -u

python=${PRETRAIN_PYTHON:-}
if [ -z "$python" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then python=$VIRTUAL_ENV/bin/python; else python=python3; fi
fi

say() { echo "[pretrain.sh $(date '+%F %T')] job $SLURM_JOB_ID: $*"; }
say "run ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES:-1} node(s) ($SLURM_JOB_NODELIST), python $python, overrides: $*"

requeue=0
on_usr1() {
    say "SIGUSR1: stopping the workers (checkpoint), then requeue"
    requeue=1
    # Job steps only (the agent on every node), which pass it on to their workers.
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
on_term() {
    say "SIGTERM: the workers checkpoint and exit"
}
trap on_usr1 USR1
trap on_term TERM

# In the background, because bash runs a trap only between commands: `wait` returns when a
# trapped signal arrives, so wait again until the launcher (srun, after exec) has exited.
"$python" -m launch launcher=slurm "$@" &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done
wait "$launcher"; rc=$?
say "training exited with status $rc"

if [ "$requeue" = 1 ]; then
    say "requeueing; the next run resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
