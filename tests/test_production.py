"""The production path: `neuromf train runspecs/picasso.yaml` itself, with only the overrides of production_path.py.

It runs as a user would (a subprocess, the real wandb in offline mode, a real stop signal), is stopped with SIGUSR1
(SLURM's wall-time signal) after its first steps, resumed with `--resume auto` to the end, and checked: exit codes,
the same wandb run id across the stop, the logged scalars in wandb's offline files, the samples decoded by the
MAISI VAE, and nothing written to $HOME. test_container.py runs this same test inside the image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _wandb_offline import wait_for_exit_record, wandb_history, wandb_run_ids
from production_path import (
    MAX_STEPS,
    PRODUCTION_SPEC,
    production_env,
    production_overrides,
    set_args,
    write_production_inputs,
)

REQUEUE_EXIT_CODE = 75


def _train(root: Path, home: Path, *extra: str) -> list[str]:
    compile_step = os.environ.get("NEUROMF_PRODUCTION_COMPILE") == "1"  # set by the image test
    return [
        sys.executable,
        "-m",
        "neuromf",
        "train",
        str(PRODUCTION_SPEC),
        *set_args(production_overrides(root, compile_step)),
        "--resume",
        "auto",
        *extra,
    ]


def _logged_steps(log: Path) -> list[int]:
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss_total" in record:
            steps.append(record["step"])
    return steps


@pytest.mark.slow  # ~1 min on a shared 2-core CPU (the README says how long)
def test_production_spec_trains_stops_resumes_and_logs_to_wandb(tmp_path: Path) -> None:
    root, home = tmp_path / "cluster", tmp_path / "home"
    home.mkdir()
    write_production_inputs(root)
    run_dir = root / "results" / "training_checkpoints" / "picasso-imf"  # the spec's paths.run_dir
    env = production_env(home)

    out = tmp_path / "first.log"
    with open(out, "w") as log_file:
        proc = subprocess.Popen(_train(root, home), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        # A cold compile of the step (inside the image) takes minutes: 15+ on a 2-core machine shared with others.
        deadline = time.monotonic() + (2400 if os.environ.get("NEUROMF_PRODUCTION_COMPILE") == "1" else 600)
        while not _logged_steps(run_dir / "training_log.jsonl") and time.monotonic() < deadline:
            assert proc.poll() is None, f"the trainer ended before its first step:\n{out.read_text()[-4000:]}"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = out.read_text()
    assert code == REQUEUE_EXIT_CODE, first[-4000:]
    assert "received SIGUSR1" in first
    stopped_at = max(_logged_steps(run_dir / "training_log.jsonl"))
    assert stopped_at < MAX_STEPS, "the stop came too late to test a resume"
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()

    second = subprocess.run(_train(root, home), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=2400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "resumed from" in second.stderr
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id

    # The run finished: every step logged once, the final checkpoint, samples decoded by the VAE.
    assert sorted(set(_logged_steps(run_dir / "training_log.jsonl"))) == list(range(1, MAX_STEPS + 1))
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    grids = sorted(run_dir.glob("samples/epoch_*/*_grid.png"))
    volumes = sorted(run_dir.glob("samples/epoch_*/*_sample_*.nii.gz"))
    assert grids and volumes, sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    import nibabel

    assert nibabel.load(volumes[-1]).shape[:3] == (32, 32, 32)  # 16^3 latents through the 2-level MAISI decoder

    # wandb offline: two runs of one id (before and after the stop), holding the scalars the trainer logged.
    files = wait_for_exit_record(run_dir / "wandb", 2)
    assert len(files) == 2, files
    assert set().union(*(wandb_run_ids(f) for f in files)) == {run_id}
    rows = [row for f in files for row in wandb_history(f)]
    train_rows = {row["_step"]: row for row in rows if "train/loss_total" in row}
    assert set(train_rows) == set(range(1, MAX_STEPS + 1)), sorted(train_rows)
    jsonl = {
        r["step"]: r
        for r in map(json.loads, (run_dir / "training_log.jsonl").read_text().splitlines())
        if "train/loss_total" in r
    }
    assert all(train_rows[s]["train/loss_total"] == pytest.approx(jsonl[s]["train/loss_total"]) for s in jsonl)
    assert any(any(k.startswith("val/") for k in row) for row in rows), "no validation scalars reached wandb"
    assert list(home.iterdir()) == [], f"the run wrote into $HOME: {list(home.rglob('*'))}"

    events = [
        r["event"] for r in map(json.loads, (run_dir / "training_log.jsonl").read_text().splitlines()) if "event" in r
    ]
    assert not [e for e in events if "torch.compile failed" in e], events
    if os.environ.get("NEUROMF_PRODUCTION_COMPILE") == "1":
        # The spec's paths.cache_dir (in the bound results folder) won over the image's read-only /cache.
        cache = root / "results" / "cache" / "torchinductor"
        assert any(p.suffix == ".so" for p in cache.rglob("*")), f"no compiled kernels in {cache}"
