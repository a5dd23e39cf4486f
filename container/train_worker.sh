#!/usr/bin/env bash
# NeuroMF SLURM worker: pre-flight checks, then `neuromf train SPEC --resume auto` inside the image. Wall-time and
# pre-emption signals are forwarded to the trainer, which finishes its step, saves a checkpoint and exits 75; this
# script then requeues the job, which comes back and resumes from that checkpoint.
#
# Several GPUs (the run-spec's hardware.nodes x hardware.gpus_per_node > 1): one task per GPU,
#   srun --nodes=M --ntasks-per-node=N --kill-on-bad-exit=1 apptainer exec --nv ... neuromf train SPEC
# in an allocation of --nodes=M --ntasks-per-node=N --gres=gpu:N (container/train.sh asks for it). The signal
# is forwarded to srun, which passes it to every task; rank 0 saves and every task exits 75.
#
# Normally submitted by container/train.sh (which adds the site options: time, CPUs, memory, GPU, constraint).
# Direct use:  sbatch --time=2-00:00:00 --gres=gpu:1 container/train_worker.sh /abs/spec.yaml [--set K=V ...]
#
# Environment (all optional; the launcher exports them):
#   NEUROMF_RUNTIME      container command (default apptainer; container/host_runtime.sh runs on the host)
#   NEUROMF_SIF          image (default $SLURM_SUBMIT_DIR/trainer.sif)
#   NEUROMF_RESUME       checkpoint for the FIRST start (default auto); a requeued job always uses auto
#   NEUROMF_MIN_FREE_GB  free space the run folder needs (default 20)
#   NEUROMF_NV           1: pass --nv (GPU) to the runtime (default), 0: do not
#   NEUROMF_BINDS        extra bind specs, comma-separated (SRC[:DST[:OPTS]],...)
#
# Exit codes: 0 done (or requeued), 2 bad input / failed pre-flight (never requeued), 75 stopped with a checkpoint
# but not requeued (SIGTERM, e.g. scancel), anything else: the trainer failed.
#
#SBATCH --job-name=neuromf_p4_train
#SBATCH --ntasks=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
set -uo pipefail # no -e: every exit status is looked at

readonly REQUEUE_EXIT_CODE=75 # the trainer's "checkpoint saved, run me again" (EX_TEMPFAIL)
RUNTIME=${NEUROMF_RUNTIME:-apptainer}
SIF=${NEUROMF_SIF:-${SLURM_SUBMIT_DIR:-$PWD}/trainer.sif}
MIN_FREE_GB=${NEUROMF_MIN_FREE_GB:-20}
RESTART=${SLURM_RESTART_COUNT:-0}
SIGNAL_SEEN="" # the last pre-emption / wall-time signal the batch shell received
child=""       # pid of the backgrounded runtime (the trainer)

log() { printf '[neuromf-worker %(%F %T)T] %s\n' -1 "$*"; }

fail() {
    # fail EXIT_CODE LINE...: a clear failure in both logs, then exit (a failed pre-flight is never requeued).
    local code=$1 line
    shift
    for line in "$@"; do
        log "PRE-FLIGHT FAILED: $line"
        printf '[neuromf-worker] PRE-FLIGHT FAILED: %s\n' "$line" >&2
    done
    exit "$code"
}

# shellcheck disable=SC2317  # called by the traps below
on_signal() {
    # The batch shell gets the signal (--signal=B:...); the trainer runs in the background, so forward it there.
    if [[ -z $child ]]; then
        SIGNAL_SEEN=$1
        log "received SIG$1 before the trainer started"
    elif kill -0 "$child" 2>/dev/null; then
        SIGNAL_SEEN=$1
        log "received SIG$1: forwarding to the trainer (pid $child) so it saves a checkpoint and exits"
        kill -s "$1" "$child" 2>/dev/null || true
    else # e.g. the SIGTERM with which SLURM ends this run of a job that `scontrol requeue` just requeued
        log "received SIG$1 after the trainer exited"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal USR2' USR2
trap 'on_signal TERM' TERM

requeue() {
    # Ask SLURM to run this job again; it resumes from the newest complete checkpoint (--resume auto).
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        log "not running under SLURM: run the same command again to resume"
        exit "$REQUEUE_EXIT_CODE"
    fi
    log "requeueing job $SLURM_JOB_ID: SLURM_RESTART_COUNT will be $((RESTART + 1)), resuming from the newest checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue $SLURM_JOB_ID failed: resubmit with container/train.sh to resume"
    exit "$REQUEUE_EXIT_CODE"
}

stop_if_signalled() {
    # A signal during the pre-flight: do not start a trainer that would be stopped at once.
    [[ -z $SIGNAL_SEEN ]] && return 0
    [[ $SIGNAL_SEEN == TERM ]] && { log "stopped by SIGTERM before training started"; exit "$REQUEUE_EXIT_CODE"; }
    requeue
}

# ---------------------------------------------------------------------------------------------------- arguments
SPEC=${1:-}
[[ -n $SPEC ]] || fail 2 "usage: train_worker.sh SPEC [--set KEY=VALUE ...]"
shift
SETS=("$@") # --set KEY=VALUE pairs, given to every neuromf command
RESUME=auto
[[ $RESTART -eq 0 && -n ${NEUROMF_RESUME:-} ]] && RESUME=$NEUROMF_RESUME

log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-no name}) on $(hostname), SLURM_RESTART_COUNT=$RESTART"
log "spec $SPEC ${SETS[*]}"
log "image $SIF, runtime $RUNTIME, resume $RESUME"

# ---------------------------------------------------------------------------------------------------- pre-flight
[[ -f $SPEC ]] || fail 2 "run-spec $SPEC not found (give an absolute path on a shared filesystem)"
command -v "$RUNTIME" >/dev/null 2>&1 ||
    fail 2 "container runtime '$RUNTIME' not found on $(hostname) (module load apptainer, or set NEUROMF_RUNTIME)"
[[ -f $SIF && -r $SIF ]] || fail 2 "image $SIF not found or not readable (build it with container/build_sif.sh, or set NEUROMF_SIF)"

if [[ -n ${CUDA_VISIBLE_DEVICES:-} || -n ${SLURM_JOB_GPUS:-} ]] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>&1) || fail 2 "a GPU was allocated but nvidia-smi cannot see it: $gpus"
    while IFS= read -r line; do log "gpu: $line"; done <<<"$gpus"
fi

# The folders the run reads and writes, read from the resolved run-spec by the image's own neuromf. Every folder is
# bound at its own path, so the paths in the run-spec mean the same inside the container.
spec_dir=$(cd "$(dirname "$SPEC")" && pwd)
if ! out=$("$RUNTIME" exec --bind "$spec_dir" "$SIF" python -m neuromf.spec.launch_info "$SPEC" "${SETS[@]}" 2>&1); then
    mapfile -t problems <<<"$out"
    fail 2 "${problems[@]}"
fi
declare -A INFO=()
folders=()
while IFS= read -r line; do # only the marked lines: a runtime may print its own warnings on the same streams
    [[ $line =~ ^neuromf-([a-z_]+):\ (.*)$ ]] || continue
    if [[ ${BASH_REMATCH[1]} == bind ]]; then folders+=("${BASH_REMATCH[2]}"); else INFO[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; fi
done <<<"$out"
[[ ${INFO[nodes]:-} =~ ^[0-9]+$ && ${INFO[gpus_per_node]:-} =~ ^[0-9]+$ && -n ${INFO[shard_dir]:-} ]] ||
    fail 2 "could not read the paths of the run-spec through the image:" "$out"
RUN_DIR=${INFO[run_dir]}
CACHE_DIR=${INFO[cache_dir]}
NODES=${INFO[nodes]}
GPUS_PER_NODE=${INFO[gpus_per_node]}
folders+=("$RUN_DIR" "$CACHE_DIR" "${INFO[shard_dir]}") # written by the run: bound too
N_TASKS=$((NODES * GPUS_PER_NODE))
LAUNCH=() # nothing for one GPU; srun with one task per GPU for several
if [[ $N_TASKS -gt 1 ]]; then
    [[ -n ${SLURM_JOB_ID:-} ]] ||
        fail 2 "the run-spec asks for $NODES node(s) x $GPUS_PER_NODE GPU(s): submit it with container/train.sh (or use torchrun outside SLURM)"
    [[ ${SLURM_NTASKS:-1} -ge $N_TASKS && ${SLURM_JOB_NUM_NODES:-1} -ge $NODES ]] ||
        fail 2 "the run-spec asks for $NODES node(s) x $GPUS_PER_NODE GPU(s), but this job has ${SLURM_JOB_NUM_NODES:-1} node(s) and ${SLURM_NTASKS:-1} task(s): submit with --nodes=$NODES --ntasks-per-node=$GPUS_PER_NODE --gres=gpu:$GPUS_PER_NODE (container/train.sh does)"
    LAUNCH=(srun --nodes="$NODES" --ntasks="$N_TASKS" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && LAUNCH+=(--cpus-per-task="$SLURM_CPUS_PER_TASK") # newer srun does not inherit it
    # Rank 0's host and a port of this job, for torch.distributed (scontrol is rarely inside the image).
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
    export MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
    export APPTAINERENV_MASTER_ADDR=$MASTER_ADDR APPTAINERENV_MASTER_PORT=$MASTER_PORT
fi
mkdir -p "$RUN_DIR" "$CACHE_DIR" "${INFO[shard_dir]}" || fail 2 "cannot create the run folder $RUN_DIR or cache $CACHE_DIR"

RT_OPTS=()
[[ ${NEUROMF_NV:-1} == 1 ]] && RT_OPTS+=(--nv)
declare -A bound=()
for folder in "${folders[@]}"; do
    [[ -n $folder && -z ${bound[$folder]:-} ]] || continue
    bound[$folder]=1
    RT_OPTS+=(--bind "$folder")
done
if [[ -n ${NEUROMF_BINDS:-} ]]; then
    RT_OPTS+=(--bind "$NEUROMF_BINDS")
fi

# Inside the image: the run-spec, its inputs (latents/shard, VAE weights), writable outputs, the GPU and precision.
if ! report=$("$RUNTIME" exec "${RT_OPTS[@]}" "$SIF" neuromf validate "$SPEC" "${SETS[@]}" --check-paths --check-device 2>&1); then
    mapfile -t problems <<<"$report"
    fail 2 "${problems[@]}"
fi
while IFS= read -r line; do log "$line"; done <<<"$report"

free_kb=$(df -Pk "$RUN_DIR" | awk 'NR == 2 { print $4 }')
if ! awk -v kb="$free_kb" -v gb="$MIN_FREE_GB" 'BEGIN { exit !(kb >= gb * 1048576) }'; then
    fail 2 "only $((free_kb / 1048576)) GB free under $RUN_DIR, need $MIN_FREE_GB GB (NEUROMF_MIN_FREE_GB)"
fi
log "pre-flight OK: $((free_kb / 1048576)) GB free under $RUN_DIR"
stop_if_signalled

# ---------------------------------------------------------------------------------------------------- training
# Both compile caches in the bound cache folder (Triton's would otherwise fall back to a /tmp folder of the node).
export TORCHINDUCTOR_CACHE_DIR=$CACHE_DIR APPTAINERENV_TORCHINDUCTOR_CACHE_DIR=$CACHE_DIR
export TRITON_CACHE_DIR=$CACHE_DIR/triton APPTAINERENV_TRITON_CACHE_DIR=$CACHE_DIR/triton
export WANDB_DIR=$RUN_DIR APPTAINERENV_WANDB_DIR=$RUN_DIR # offline wandb runs land in the run folder
log "starting the trainer: ${LAUNCH[*]}${LAUNCH:+ }neuromf train $SPEC ${SETS[*]} --resume $RESUME${LAUNCH:+ ($N_TASKS tasks, rank 0 on $MASTER_ADDR:$MASTER_PORT)}"
# In the background: bash runs a trap only between commands, so a foreground trainer would defer it until it exits.
"${LAUNCH[@]}" "$RUNTIME" exec "${RT_OPTS[@]}" "$SIF" neuromf train "$SPEC" "${SETS[@]}" --resume "$RESUME" &
child=$!
# A trapped signal makes `wait` return early (status > 128) while the trainer is still saving: wait again until it
# is gone, then once more for its real exit status (bash remembers it).
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
rc=$?

case $rc in
    0)
        log "trainer finished (exit 0): training complete, outputs in $RUN_DIR"
        exit 0
        ;;
    "$REQUEUE_EXIT_CODE")
        log "trainer saved a checkpoint and exited $REQUEUE_EXIT_CODE${SIGNAL_SEEN:+ after SIG$SIGNAL_SEEN}"
        if [[ $SIGNAL_SEEN == TERM ]]; then
            log "SIGTERM means scancel or a hard kill: not requeueing; resubmit to resume"
            exit "$REQUEUE_EXIT_CODE"
        fi
        requeue
        ;;
    2)
        log "trainer refused its input (exit 2): not requeueing"
        exit 2
        ;;
    *)
        if [[ -n $SIGNAL_SEEN && $SIGNAL_SEEN != TERM && $rc -eq $((128 + $(kill -l "$SIGNAL_SEEN"))) ]]; then
            # Killed by the forwarded signal before it could install its handler: nothing newer to save.
            log "trainer was stopped by SIG$SIGNAL_SEEN before it could save; resuming from the last checkpoint"
            requeue
        fi
        log "trainer failed (exit $rc): not requeueing"
        exit "$rc"
        ;;
esac
