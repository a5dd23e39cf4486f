#!/usr/bin/env bash
# The first GPU session in one command (<= 9 minutes on one H100/H200): doctor, the compare at batch 8, the batch-24
# memory check with and without checkpointing, CUDA graphs on/off, the fold A/B. Everything lands in OUT:
#   OUT/NN_<stage>.json   each stage's JSON (doctor report or `neuromf bench --json`)
#   OUT/NN_<stage>.log    each stage's full output
#   OUT/summary.md        the stages in order: status, seconds, and their printed tables (appended as they finish)
# A stage gets at most the time that is left (`timeout`); one that does not fit its minimum is skipped, one that runs
# out is killed and marked "timed out", and what came before stays. Stages run in separate processes.
#
#   scripts/gpu_check.sh OUT [CACHE_DIR]        e.g. scripts/gpu_check.sh gpu_check /scratch/inductor-cache
#
# Environment (all optional):
#   GPU_CHECK_SPEC      run-spec (default runspecs/picasso.yaml; its data are not needed: the bench uses synthetic latents)
#   GPU_CHECK_BUDGET_S  total seconds (default 540)
#   GPU_CHECK_SETS      extra --set KEY=VALUE overrides, space-separated (e.g. a tiny model for a CPU test)
#   GPU_CHECK_STEPS     timed steps per bench variant (default 5)
#   GPU_CHECK_COMPARE   variants of the batch-8 compare (default predecessor,naive,eager,compiled)
#   GPU_CHECK_BIG_BATCH batch of the memory check (default 24)
#   NEUROMF             the neuromf command (default: neuromf on PATH, else python -m neuromf)
set -uo pipefail # no -e: a failed stage is recorded, the next one runs

OUT=${1:?usage: scripts/gpu_check.sh OUT [CACHE_DIR]}
CACHE=${2:-$OUT/inductor-cache}
SPEC=${GPU_CHECK_SPEC:-runspecs/picasso.yaml}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STEPS=${GPU_CHECK_STEPS:-5}
COMPARE=${GPU_CHECK_COMPARE:-predecessor,naive,eager,compiled}
BIG=${GPU_CHECK_BIG_BATCH:-24}
if [[ -n ${NEUROMF:-} ]]; then
    read -ra CMD <<<"$NEUROMF"
elif command -v neuromf >/dev/null; then
    CMD=(neuromf)
else
    CMD=(python -m neuromf)
fi

mkdir -p "$OUT" "$CACHE" || exit 2
export TORCHINDUCTOR_CACHE_DIR=$CACHE # compiled kernels survive for the next session (and the training run)
SETS=(--set "paths.cache_dir=$CACHE" --set "paths.run_dir=$OUT/run")
for s in ${GPU_CHECK_SETS:-}; do SETS+=(--set "$s"); done
SUMMARY=$OUT/summary.md
START=$SECONDS
n=0

{
    echo "# NeuroMF GPU check: $(date -u +%FT%TZ)"
    echo
    echo "spec \`$SPEC\`, budget ${BUDGET} s, compile cache \`$CACHE\`"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    python - <<'EOF' 2>/dev/null || true
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else None}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
EOF
    echo '```'
} >"$SUMMARY"
cat "$SUMMARY"

stage() {
    # stage NAME MIN_SECONDS ARGS...: run `neuromf ARGS --json OUT/NN_NAME.json` within the time left.
    local name=$1 min=$2 left status rc t0
    shift 2
    n=$((n + 1))
    local tag
    tag=$(printf '%02d_%s' "$n" "$name")
    left=$((BUDGET - (SECONDS - START)))
    if ((left < min)); then
        status="skipped (${left} s left, needs >= ${min} s)"
        printf '\n## %s: %s\n' "$tag" "$status" | tee -a "$SUMMARY"
        return
    fi
    echo "=== $tag (up to ${left} s): ${CMD[*]} $*"
    t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$left" "${CMD[@]}" "$@" --json "$OUT/$tag.json" >"$OUT/$tag.log" 2>&1
    rc=$?
    case $rc in
        0) status="done" ;;
        124 | 137) status="timed out after $((SECONDS - t0)) s (what it printed is in $tag.log)" ;;
        1) status="done, with failures (exit 1)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    {
        printf '\n## %s: %s (%d s)\n\n' "$tag" "$status" "$((SECONDS - t0))"
        echo '```'
        grep -v -e '^\s*$' -e 'Warning' -e 'warn(' "$OUT/$tag.log" | tail -n 60
        echo '```'
    } >>"$SUMMARY"
    echo "--- $tag: $status"
    grep -E '^(PASS|FAIL|SKIP) |speedup_|memory_|cost_|^  \[' "$OUT/$tag.log" || true
}

B=(--data synthetic --steps "$STEPS" --warmup 1)
stage doctor 60 doctor "$SPEC" "${SETS[@]}"
stage compare_b8 90 bench "$SPEC" "${SETS[@]}" "${B[@]}" --batch 8 --variants "$COMPARE" --interleave
stage "memory_b${BIG}" 45 bench "$SPEC" "${SETS[@]}" "${B[@]}" --batch "$BIG" --variants compiled --checkpointing off
stage "memory_b${BIG}_ckpt" 45 bench "$SPEC" "${SETS[@]}" "${B[@]}" --batch "$BIG" --variants compiled --checkpointing on
stage cudagraphs_b8 60 bench "$SPEC" "${SETS[@]}" "${B[@]}" --batch 8 --variants compiled --compile-mode reduce-overhead
stage fold_ab_b8 60 bench "$SPEC" "${SETS[@]}" "${B[@]}" --batch 8 --variants compiled,compiled_nofold --interleave

printf '\ntotal %d s of %d s\n' "$((SECONDS - START))" "$BUDGET" | tee -a "$SUMMARY"
