"""The SLURM wrapper on a real single-node SLURM (tests/slurm_fixture.py): wall-time signal, requeue, exact resume.

The real launcher submits the real worker; the container runtime is container/host_runtime.sh (no Apptainer here),
so `neuromf` runs on the host. The job's time limit (2 min, signal 60 s before it, so 30-60 s after the start) is
shorter than the training, so the job is signalled, saves, requeues itself and resumes. Its final weights must equal,
bit for bit, those of the same run-spec trained without interruption (run at the same time, outside SLURM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from slurm_fixture import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture is used by name)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "runspecs" / "demo.yaml"
BATCH = 4
TRAINING_SECONDS = 75  # longer than the first leg can train (the signal comes 30-60 s after the job starts)
SHORT_RUN = [
    "hardware.num_threads=1",  # the same thread count in both runs: float sums do not depend on scheduling
    "model.spatial_size=[16,16,16]",
    "data.demo.size=16",
    "data.demo.n_volumes=40",
    f"training.batch_size={BATCH}",
    "training.warmup_steps=5",
    "logging.log_every_n_steps=10",
    "logging.progress=plain",
    "sampling.every_n_epochs=1000",  # samples only at the end
]
needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("neuromf.cli.train") is None, reason="`neuromf train` does not exist yet"
)


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def job_env(cluster: SlurmCluster, tmp_path: Path, **extra: str) -> dict[str, str]:
    """What the launcher needs here: the host runtime, a placeholder image, and site options this node can meet."""
    sif = tmp_path / "trainer.sif"
    sif.write_text("placeholder: container/host_runtime.sh runs neuromf on the host\n")
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("NEUROMF_", "SLURM_JOB", "SLURM_RESTART"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
        NEUROMF_RUNTIME=str(REPO / "container" / "host_runtime.sh"),
        NEUROMF_SIF=str(sif),
        NEUROMF_TIME="2",  # minutes
        NEUROMF_SIGNAL_LEAD="60",
        NEUROMF_CPUS="1",
        NEUROMF_MEM="1G",
        NEUROMF_CONSTRAINT="",  # no dgx nodes and no GPUs here
        NEUROMF_GRES="",
        NEUROMF_MIN_FREE_GB="1",
    )
    env.update(extra)
    return env


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "container" / "train.sh"), *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )


def seconds_per_step(run_dir: Path) -> float:
    """Time a few steps of the short run on this machine now (the 2 cores are shared, so speed varies ~3x)."""
    cmd = [
        str(VENV_BIN / "neuromf"),
        "train",
        str(DEMO),
        *sets(
            *SHORT_RUN,
            "training.max_steps=9",
            "training.warmup_steps=1",
            "logging.log_every_n_steps=8",
            f"paths.run_dir={run_dir}",
        ),
    ]
    subprocess.run(cmd, capture_output=True, timeout=180, cwd=REPO)
    rates = [
        rec["train/latents_per_s"]
        for rec in map(json.loads, (run_dir / "training_log.jsonl").read_text().splitlines())
        if rec.get("step") == 8 and "train/latents_per_s" in rec
    ]
    assert rates, f"the calibration run logged no speed at step 8 in {run_dir}"
    return BATCH / rates[0]


def wait_with_one_overrun(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout: float) -> dict[str, str]:
    """Wait for the job to end. Once the trainer has saved on the wall-time signal, give the job time to finish.

    Every leg of a 2-minute job trains only 30-60 s minus its start-up (pre-flight, imports, data), which on a busy
    2-core machine leaves a few steps: raising the limit of the requeued job (as an admin would, `scontrol update`)
    lets the second leg finish, so the test stays short whatever the load.
    """
    finished = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"}
    deadline = time.monotonic() + timeout
    extended = False
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        if info.get("JobState") in finished:
            break
        if not extended and (run_dir / "training_log.jsonl").exists():
            try:
                saved = any(e.startswith("SIGUSR1: saved") for e in events(run_dir))
            except json.JSONDecodeError:  # a line being written
                saved = False
            if saved:
                done = cluster.cmd("scontrol", "update", f"JobId={job_id}", "TimeLimit=15")
                assert done.returncode == 0, done.stderr
                extended = True
        time.sleep(1)
    return info


def final_state(run_dir: Path) -> dict[str, Any]:
    import torch

    return torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)


def events(run_dir: Path) -> list[str]:
    lines = (run_dir / "training_log.jsonl").read_text().splitlines()
    return [rec["event"] for rec in map(json.loads, lines) if "event" in rec]


def test_launcher_refuses_an_invalid_runspec_before_submitting(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    env = job_env(slurm_cluster, tmp_path)
    before = slurm_cluster.jobs()
    schema = launch(env, str(DEMO), *sets(f"paths.run_dir={tmp_path / 'a'}", "training.batch_size=0"))
    assert schema.returncode == 2, schema
    assert "nothing submitted" in schema.stderr and "training.batch_size" in schema.stderr
    paths = launch(
        env,
        str(DEMO),
        *sets(f"paths.run_dir={tmp_path / 'b'}", "data.source=folder", f"data.latent_dir={tmp_path / 'missing'}"),
    )
    assert paths.returncode == 2, paths
    assert re.search(r"data.latent_dir: \S+missing is not a folder", paths.stderr), paths.stderr
    assert "submitted job" not in schema.stdout + paths.stdout
    # The controller never heard of a job: none queued, none finished, since these submissions.
    assert slurm_cluster.jobs() == before
    assert slurm_cluster.cmd("squeue", "-h").stdout.strip() == ""


@needs_trainer
def test_wall_time_signal_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    reference_dir, slurm_dir = tmp_path / "reference" / "run", tmp_path / "slurm" / "run"
    # Steps enough for ~TRAINING_SECONDS here and now, so the job surely overruns a leg but needs few legs.
    step_s = seconds_per_step(tmp_path / "calibration")
    max_steps = max(40, min(400, round(TRAINING_SECONDS / step_s)))
    short_run = [*SHORT_RUN, f"training.max_steps={max_steps}"]
    # The uninterrupted run, at the same time as the job (one thread each on this 2-core machine).
    ref_log = tmp_path / "reference.log"
    with open(ref_log, "w") as ref_out:
        reference = subprocess.Popen(
            [str(VENV_BIN / "neuromf"), "train", str(DEMO), *sets(*short_run, f"paths.run_dir={reference_dir}")],
            stdout=ref_out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        env = job_env(slurm_cluster, tmp_path)
        submitted = launch(env, str(DEMO), *sets(*short_run, f"paths.run_dir={slurm_dir}"))
        assert submitted.returncode == 0, submitted
        job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)  # type: ignore[union-attr]
        t0 = time.monotonic()
        info = wait_with_one_overrun(slurm_cluster, job_id, slurm_dir, timeout=240)
        elapsed = time.monotonic() - t0
        reference.wait(timeout=240)
    finally:
        if reference.poll() is None:
            reference.kill()
    log_dir = tmp_path / "slurm" / "phase_4" / "logs"
    out = (log_dir / f"neuromf_p4_train_{job_id}.out").read_text()
    err = (log_dir / f"neuromf_p4_train_{job_id}.err").read_text()
    story = f"job {info}\n--- .out\n{out}\n--- .err (tail)\n{err[-3000:]}\n{slurm_cluster.logs()}"
    assert info.get("JobState") == "COMPLETED", story
    assert reference.returncode == 0, ref_log.read_text()[-3000:]
    assert int(info["Restarts"]) >= 1, story

    # The time-limit signal reached the batch shell, was forwarded, and the trainer saved and asked for a requeue.
    assert "received SIGUSR1: forwarding to the trainer" in out, story
    assert "received SIGUSR1: finishing the current step, then saving a checkpoint" in err, story
    assert "trainer saved a checkpoint and exited 75 after SIGUSR1" in out, story
    assert f"requeueing job {job_id}: SLURM_RESTART_COUNT will be 1" in out, story
    # The requeued job came back (same job id, log appended) and resumed where it stopped.
    assert "SLURM_RESTART_COUNT=0" in out and "SLURM_RESTART_COUNT=1" in out, story
    assert "trainer finished (exit 0)" in out, story
    done = events(slurm_dir)
    saved = [int(m.group(1)) for e in done if (m := re.match(r"SIGUSR1: saved \S+latest.pt at step (\d+)", e))]
    resumed = [int(m.group(1)) for e in done if (m := re.match(r"resumed from \S+ at step (\d+)", e))]
    assert saved and 0 < saved[0] < max_steps, done
    assert resumed[: len(saved)] == saved, done  # every stop was resumed at exactly the saved step

    # Same final parameters as the uninterrupted run, bit for bit.
    got, want = final_state(slurm_dir), final_state(reference_dir)
    assert got["global_step"] == want["global_step"] == max_steps
    for key in ("model_state_dict", "ema_state_dict"):
        assert got[key].keys() == want[key].keys()
        differ = [name for name in want[key] if not got[key][name].equal(want[key][name])]
        assert not differ, f"{key}: {len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    print(
        f"job {job_id}: {max_steps} steps at {step_s:.2f} s/step, {info['Restarts']} restart(s), stops at {saved}, "
        f"{elapsed:.0f} s in SLURM"
    )
