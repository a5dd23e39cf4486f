#!/usr/bin/env bash
# Training speed of the demo for 1 and 2 torch threads, each alone and beside one competing CPU-bound process
# (`python3 -c 'while True: pass'`), run in turn (interleaved) so that a change of machine load hits every
# configuration alike. Each run trains runspecs/demo.yaml in a temporary folder for WINDOW seconds of steps and
# is then stopped (SIGTERM: the trainer saves and exits 75); steps/s comes from the times of the logged steps,
# so start-up is not counted. Prints a Markdown table for docs/benchmarks.md.
#
#   scripts/demo_timing.sh                  # 2 rounds x 4 configurations x 40 s: about 9 minutes (after make setup)
#   WINDOW=30 ROUNDS=1 scripts/demo_timing.sh
#   scripts/demo_timing.sh --set training.batch_size=8    # extra arguments go to every `neuromf train`
#
# Measure on a machine doing nothing else: the load average before and after is printed with the table.
set -euo pipefail

cd "$(dirname "$0")/.."
NEUROMF=${NEUROMF:-.venv/bin/neuromf}
PYTHON=${PYTHON:-.venv/bin/python}
SPEC=${SPEC:-runspecs/demo.yaml}
WINDOW=${WINDOW:-40}   # seconds of training steps per run
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-"1 2"}
CONFIGS=()
for threads in $THREADS; do CONFIGS+=("$threads idle" "$threads busy"); done

work=$(mktemp -d "${TMPDIR:-/tmp}/demo_timing.XXXXXX")
competitor=""
trainer=""
cleanup() {
    if [ -n "$trainer" ]; then kill "$trainer" 2>/dev/null || true; fi
    if [ -n "$competitor" ]; then kill "$competitor" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
# torch's thread count comes from hardware.num_threads alone, not from the caller's environment.
unset OMP_NUM_THREADS MKL_NUM_THREADS

# Only steps are timed: no validation, samples or checkpoints inside the window; progress as plain lines.
COMMON=(--set logging.log_every_n_steps=1 --set logging.progress=plain --set logging.val_every_n_epochs=100000
        --set sampling.every_n_epochs=100000 --set checkpoint.save_every_n_epochs=100000
        --set checkpoint.latest_every_n_steps=100000 "$@")
TOTAL_STEPS=$("$PYTHON" -c "import sys; from neuromf.spec import load_runspec
s = load_runspec(sys.argv[1]); print(s.training.max_steps or 'unknown')" "$SPEC" 2>/dev/null || echo unknown)

echo "building the demo data once ..." >&2
"$NEUROMF" train "$SPEC" --dry-run --set paths.run_dir="$work/prepared" "${COMMON[@]}" --set hardware.num_threads=1 \
    > "$work/prepare.log" 2>&1 || { cat "$work/prepare.log" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo x; }  # user + system time of a process
last_step() { tail -n 1 "$1/training_log.jsonl" 2>/dev/null | grep -o '"step": [0-9]*' | grep -o '[0-9]*$' || echo x; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$ROUNDS"); do
    for config in "${CONFIGS[@]}"; do
        read -r threads load <<< "$config"
        run="$work/r${round}_t${threads}_${load}"
        mkdir -p "$run"
        cp -r "$work/prepared/data" "$run/data"
        if [ "$load" = busy ]; then python3 -c 'while True: pass' & competitor=$!; fi
        "$NEUROMF" train "$SPEC" --set paths.run_dir="$run" --set hardware.num_threads="$threads" "${COMMON[@]}" \
            > "$run.log" 2>&1 & trainer=$!
        # WINDOW seconds from the first logged step (or give up after start-up + WINDOW + 120 s).
        start=$SECONDS first="" cpu0="" cpu1=""
        while kill -0 "$trainer" 2>/dev/null; do
            if [ -z "$first" ] && [ -s "$run/training_log.jsonl" ]; then
                first=$SECONDS; cpu0="$(cpu_ticks "$trainer") $(last_step "$run")"
            fi
            if [ -n "$first" ] && (( SECONDS - first >= WINDOW )); then break; fi
            if (( SECONDS - start >= WINDOW + 120 )); then break; fi
            sleep 1
        done
        cpu1="$(cpu_ticks "$trainer") $(last_step "$run")"
        kill -TERM "$trainer" 2>/dev/null || true
        wait "$trainer" 2>/dev/null || true
        trainer=""
        if [ -n "$competitor" ]; then kill "$competitor" 2>/dev/null || true; wait "$competitor" 2>/dev/null || true; competitor=""; fi
        "$PYTHON" - "$run/training_log.jsonl" "$round" "$threads" "$load" "$cpu0" "$cpu1" "$(getconf CLK_TCK)" \
            >> "$work/rates.tsv" <<'EOF'
import json, sys
path, round_, threads, load, cpu0, cpu1, tick = sys.argv[1:]
try:  # CPU seconds per step of the trainer process, between the first poll that saw a step and the stop
    (c0, s0), (c1, s1) = (map(int, cpu0.split()), map(int, cpu1.split()))
    cpu = (c1 - c0) / int(tick) / (s1 - s0)
except (ValueError, ZeroDivisionError):
    cpu = float("nan")
try:
    steps = sorted((r["step"], r["time"]) for r in map(json.loads, open(path)) if "train/mse_fm" in r)
except (OSError, ValueError):
    steps = []
steps = [s for s in steps if s[0] >= 3]  # steps 1-2 allocate and warm up
rate = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1]) if len(steps) >= 2 and steps[-1][1] > steps[0][1] else float("nan")
print(f"{round_}\t{threads}\t{load}\t{rate:.4f}\t{cpu:.4f}")
EOF
        echo "round $round: $threads thread(s), $load: $(tail -1 "$work/rates.tsv" | cut -f4) steps/s" >&2
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

"$PYTHON" - "$work/rates.tsv" "$TOTAL_STEPS" "$WINDOW" "$load_before" "$load_after" "$SPEC" "$*" <<'EOF'
import math, platform, statistics, subprocess, sys, time
import torch
path, total, window, before, after, spec, extra = sys.argv[1:]
rows = [line.split("\t") for line in open(path).read().splitlines()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
cores = len(__import__("os").sched_getaffinity(0))
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} cores ({cpu}), torch {torch.__version__}, "
      f"{spec}{' ' + extra if extra else ''}; {window} s of steps per run, rounds interleaved; "
      f"load average (1, 5, 15 min) before: {before}, after: {after}")
print()
print(f"| torch threads | competing process | steps/s per round | median steps/s | CPU s/step | {total} steps take |")
print("| --- | --- | --- | --- | --- | --- |")
seen = []
for _, threads, load, _, _ in rows:
    if (threads, load) not in seen:
        seen.append((threads, load))
for threads, load in seen:
    rates = [float(r[3]) for r in rows if (r[1], r[2]) == (threads, load)]
    cpus = [float(r[4]) for r in rows if (r[1], r[2]) == (threads, load) and math.isfinite(float(r[4]))]
    cpu = f"{statistics.median(cpus):.2f}" if cpus else "?"
    finite = [r for r in rates if math.isfinite(r)]
    median = statistics.median(finite) if finite else math.nan
    duration = "?" if not finite or total == "unknown" or median <= 0 else \
        f"{int(int(total) / median // 60)} min {int(int(total) / median % 60):02d} s"
    print(f"| {threads} | {'one (busy loop)' if load == 'busy' else 'none'} | "
          f"{', '.join(f'{r:.2f}' if math.isfinite(r) else 'too few' for r in rates)} | {median:.2f} | {cpu} | {duration} |")
print()
print("Steps only: start-up, validation and samples come on top (the demo's own log). A rate 'too few': fewer "
      "than two steps after the first two within the window. CPU s/step above wall s/step: threads spinning while they wait.")
EOF
