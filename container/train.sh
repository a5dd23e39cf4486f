#!/usr/bin/env bash
# NeuroMF launcher (login node): validate the run-spec through the image, create the output folders, submit
# container/train_worker.sh with sbatch. Nothing is submitted unless the run-spec and its paths are valid.
#
#   container/train.sh [OPTIONS] SPEC [--set KEY=VALUE ...] [-- EXTRA_SBATCH_OPTIONS ...]
#
# Options (each also read from the environment variable in brackets; an empty value drops the sbatch option):
#   --time T           wall time                                   [NEUROMF_TIME, default 2-00:00:00]
#   --cpus N           CPUs per task (one task per GPU)            [NEUROMF_CPUS, default 16]
#   --mem M            memory per node                             [NEUROMF_MEM, default 64G]
#   --constraint C     node features                               [NEUROMF_CONSTRAINT, default dgx]
#   --gres G           generic resources per node                  [NEUROMF_GRES, default gpu:<hardware.gpus_per_node>]
#   --partition P      partition                                   [NEUROMF_PARTITION, default: the site's]
#   --account A        account                                     [NEUROMF_ACCOUNT, default: the site's]
#   --job-name N       job name                                    [NEUROMF_JOB_NAME, default neuromf_p4_train]
#   --signal SIG       wall-time / pre-emption signal to the batch shell: USR1, or USR2 (the default when the
#                      run-spec asks for more than one GPU: NCCL uses USR1)               [NEUROMF_SIGNAL]
#   --signal-lead S    seconds before the time limit the signal is sent                   [NEUROMF_SIGNAL_LEAD, 600]
#   --results DIR      results folder; logs go to DIR/phase_4/logs
#                      (default: paths.results_root, else the run folder's parent)        [NEUROMF_RESULTS]
#   --sif PATH         the image                                   [NEUROMF_SIF, default ./trainer.sif]
#   --runtime CMD      container command                           [NEUROMF_RUNTIME, default apptainer]
#   --resume auto|PATH checkpoint for the first start (a requeued job always resumes with auto) [NEUROMF_RESUME]
#   --dry-run          validate and print the sbatch command, submit nothing
#
# Several GPUs: the run-spec's hardware.nodes (M) and hardware.gpus_per_node (N) give --nodes=M --ntasks=M*N
# --ntasks-per-node=N --gres=gpu:N, and the worker starts one trainer per GPU with srun (torch.distributed, NCCL).
# training.batch_size stays the global batch: each GPU trains on batch_size / (M * N) latents per step.
#
# Exit codes: 0 submitted (prints the job id), 2 invalid run-spec or options (nothing submitted), other: sbatch failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIME=${NEUROMF_TIME-2-00:00:00}
CPUS=${NEUROMF_CPUS-16}
MEM=${NEUROMF_MEM-64G}
CONSTRAINT=${NEUROMF_CONSTRAINT-dgx}
GRES=${NEUROMF_GRES-default} # "default": gpu:<hardware.gpus_per_node>, decided once the run-spec is read
PARTITION=${NEUROMF_PARTITION-}
ACCOUNT=${NEUROMF_ACCOUNT-}
JOB_NAME=${NEUROMF_JOB_NAME-neuromf_p4_train}
SIGNAL=${NEUROMF_SIGNAL-}
SIGNAL_LEAD=${NEUROMF_SIGNAL_LEAD-600}
RESULTS=${NEUROMF_RESULTS-}
SIF=${NEUROMF_SIF-$PWD/trainer.sif}
RUNTIME=${NEUROMF_RUNTIME-apptainer}
RESUME=${NEUROMF_RESUME-}
DRY_RUN=0

die() {
    local line
    for line in "$@"; do printf 'train.sh: %s\n' "$line" >&2; done
    exit 2
}
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

SPEC=""
SETS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --time | --cpus | --mem | --constraint | --gres | --partition | --account | --job-name | --signal | \
            --signal-lead | --results | --sif | --runtime | --resume | --set)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case $1 in
                --time) TIME=$2 ;;
                --cpus) CPUS=$2 ;;
                --mem) MEM=$2 ;;
                --constraint) CONSTRAINT=$2 ;;
                --gres) GRES=$2 ;;
                --partition) PARTITION=$2 ;;
                --account) ACCOUNT=$2 ;;
                --job-name) JOB_NAME=$2 ;;
                --signal) SIGNAL=$2 ;;
                --signal-lead) SIGNAL_LEAD=$2 ;;
                --results) RESULTS=$2 ;;
                --sif) SIF=$2 ;;
                --runtime) RUNTIME=$2 ;;
                --resume) RESUME=$2 ;;
                --set) SETS+=(--set "$2") ;;
            esac
            shift 2
            ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [[ -z $SPEC ]] || die "only one SPEC, got '$SPEC' and '$1'"
            SPEC=$1
            shift
            ;;
    esac
done

[[ -n $SPEC ]] || die "usage: container/train.sh [OPTIONS] SPEC [--set KEY=VALUE ...] [-- SBATCH_OPTIONS]"
[[ -f $SPEC ]] || die "$SPEC: no such run-spec file"
SPEC=$(cd "$(dirname "$SPEC")" && pwd)/$(basename "$SPEC") # the job may start elsewhere: absolute path
[[ -z $SIGNAL || $SIGNAL == USR1 || $SIGNAL == USR2 ]] || die "--signal: USR1 or USR2, got '$SIGNAL'"
[[ $SIGNAL_LEAD =~ ^[0-9]+$ ]] || die "--signal-lead: whole seconds, got '$SIGNAL_LEAD'"
[[ $SIF == /* ]] || SIF=$PWD/$SIF
[[ -f $SIF ]] || die "image $SIF not found: build it with container/build_sif.sh (or give --sif)"
command -v "$RUNTIME" >/dev/null 2>&1 || die "container runtime '$RUNTIME' not found (module load apptainer, or --runtime)"
[[ $DRY_RUN == 1 ]] || command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node"

# Read the folders from the resolved run-spec with the image's own neuromf (a parse error stops here).
spec_dir=$(dirname "$SPEC")
if ! out=$("$RUNTIME" exec --bind "$spec_dir" "$SIF" python -m neuromf.spec.launch_info "$SPEC" "${SETS[@]}" 2>&1); then
    mapfile -t problems <<<"$out"
    die "invalid run-spec $SPEC, nothing submitted:" "${problems[@]}"
fi
declare -A INFO=()
READS=()
while IFS= read -r line; do # only the marked lines: a runtime may print warnings around them
    [[ $line =~ ^neuromf-([a-z_]+):\ (.*)$ ]] || continue
    if [[ ${BASH_REMATCH[1]} == bind ]]; then READS+=("${BASH_REMATCH[2]}"); else INFO[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; fi
done <<<"$out"
[[ ${INFO[nodes]:-} =~ ^[0-9]+$ && ${INFO[gpus_per_node]:-} =~ ^[0-9]+$ && -n ${INFO[cache_dir]:-} ]] ||
    die "could not read the run-spec's paths through the image:" "$out"
RUN_DIR=${INFO[run_dir]}
RESULTS=${RESULTS:-${INFO[results_root]}}
CACHE_DIR=${INFO[cache_dir]}
NODES=${INFO[nodes]}
GPUS_PER_NODE=${INFO[gpus_per_node]}
N_GPUS=$((NODES * GPUS_PER_NODE))
[[ $GRES == default ]] && GRES=gpu:$GPUS_PER_NODE
[[ -n $SIGNAL ]] || { [[ $N_GPUS -gt 1 ]] && SIGNAL=USR2 || SIGNAL=USR1; }
LOG_DIR=$RESULTS/phase_4/logs

# Outputs are created here, on the login node, so the job's binds and log files have somewhere to go.
mkdir -p "$RUN_DIR" "$CACHE_DIR" "$LOG_DIR" || die "cannot create $RUN_DIR, $CACHE_DIR or $LOG_DIR"
binds=(--bind "$spec_dir" --bind "$RUN_DIR" --bind "$CACHE_DIR")
for folder in "${READS[@]}"; do binds+=(--bind "$folder"); done
if ! report=$("$RUNTIME" exec "${binds[@]}" "$SIF" neuromf validate "$SPEC" "${SETS[@]}" --check-paths 2>&1); then
    mapfile -t problems <<<"$report"
    die "invalid run-spec $SPEC, nothing submitted:" "${problems[@]}"
fi
printf '%s\n' "$report"

args=(--parsable --export=ALL --job-name="$JOB_NAME" --requeue --open-mode=append
    --signal="B:$SIGNAL@$SIGNAL_LEAD" --output="$LOG_DIR/%x_%j.out" --error="$LOG_DIR/%x_%j.err")
if [[ $N_GPUS -gt 1 ]]; then # one task per GPU (--ntasks too: it would win over --ntasks-per-node)
    args+=(--nodes="$NODES" --ntasks="$N_GPUS" --ntasks-per-node="$GPUS_PER_NODE")
else
    args+=(--ntasks=1)
fi
[[ -n $TIME ]] && args+=(--time="$TIME")
[[ -n $CPUS ]] && args+=(--cpus-per-task="$CPUS")
[[ -n $MEM ]] && args+=(--mem="$MEM")
[[ -n $CONSTRAINT ]] && args+=(--constraint="$CONSTRAINT")
[[ -n $GRES ]] && args+=(--gres="$GRES")
[[ -n $PARTITION ]] && args+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && args+=(--account="$ACCOUNT")
args+=("${EXTRA[@]}")

# The worker reads these (sbatch --export=ALL hands them over; a requeued job gets them again).
export NEUROMF_RUNTIME=$RUNTIME NEUROMF_SIF=$SIF
[[ -n $RESUME ]] && export NEUROMF_RESUME=$RESUME
cmd=(sbatch "${args[@]}" "$REPO/container/train_worker.sh" "$SPEC" "${SETS[@]}")
if [[ $DRY_RUN == 1 ]]; then
    printf 'dry run, would submit:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
job=$("${cmd[@]}")
job=${job%%;*}
log=$LOG_DIR/${JOB_NAME}_$job
cat <<EOF
submitted job $job ($JOB_NAME, $NODES node(s) x $GPUS_PER_NODE GPU(s)), signal SIG$SIGNAL $SIGNAL_LEAD s before the time limit
  run folder:  $RUN_DIR   (checkpoints/, samples/, training_log.jsonl)
  logs:        $log.out  $log.err
  watch:       squeue -j $job;  tail -f $log.out
  requeue now: scancel --batch --signal=$SIGNAL $job   (saves a checkpoint, requeues, resumes)
  stop:        scancel $job   (saves a checkpoint, no requeue; run this script again to resume)
EOF
