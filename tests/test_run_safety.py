"""A run never silently loses or corrupts its work (issue 15): damaged checkpoints, the run-folder lock,
disk full, read-only folders, hardened run-specs, temporaries of killed writes, refused resumes, stop signals.

Each test asserts the exit code, the single message line (no traceback) and what is on disk afterwards.
One tiny run is trained once per session; tests work on copies of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _tiny_run import tiny_run_raw

from neuromf.cli import main
from neuromf.data.demo import build_demo_dataset
from neuromf.errors import UserError
from neuromf.spec import runspec_from_dict
from neuromf.train.checkpoint import FORMAT, CheckpointDir, load_checkpoint, save_checkpoint_file
from neuromf.train.lock import RunLock
from neuromf.train.loop import Trainer, train
from neuromf.train.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
RUNSPEC = REPO / "runspecs" / "demo.yaml"


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 8-step tiny run (2 epochs of 4 steps): latest, latest.prev, epoch_0001/2, best, samples."""
    base = tmp_path_factory.mktemp("safety")
    latents = build_demo_dataset(base / "latents", n_volumes=24, size=16, seed=0)
    run_dir = base / "run"
    assert train(runspec_from_dict(tiny_run_raw(latents, run_dir, 8), base_dir=base)) == 0
    return {"latents": latents, "run": run_dir}


def copy_run(trained: dict[str, Path], dest: Path, *, latents: bool = False) -> tuple[Path, Path]:
    """A copy of the trained run (and of its latents when asked) and a run-spec file for the copy."""
    run_dir = dest / "run"
    shutil.copytree(trained["run"], run_dir)
    latent_dir = trained["latents"]
    if latents:
        latent_dir = dest / "latents"
        shutil.copytree(trained["latents"], latent_dir)
    return run_dir, write_spec(latent_dir, run_dir, 8)


def write_spec(latent_dir: Path, run_dir: Path, max_steps: int, **changes: dict[str, Any]) -> Path:
    raw = tiny_run_raw(latent_dir, run_dir, max_steps)
    for section, values in changes.items():
        raw[section].update(values)
    path = run_dir.parent / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (but the lock, rewritten by every start) -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `neuromf ARGV` in this process."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


# ---------------------------------------------------------------- 1, 4: damaged checkpoints are skipped


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor record of a torch zip file (its pickle stays valid)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        where = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x5A]))


def damage(path: Path, how: str) -> None:
    if how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "bad-pickle":  # an object weights_only refuses
        import datetime

        torch.save({"format": FORMAT, "when": datetime.datetime(2020, 1, 1)}, path)
    elif how == "missing-keys":
        torch.save({"format": FORMAT, "global_step": 3}, path)
    elif how == "non-finite":
        state = load_checkpoint(path)
        name = next(iter(state["model_state_dict"]))
        state["model_state_dict"][name].fill_(float("nan"))
        save_checkpoint_file(state, path)  # a valid digest: the NaN check must find it
    elif how == "flipped-bytes":
        flip_tensor_byte(path)


DAMAGES = ["zero-bytes", "truncated", "bad-pickle", "missing-keys", "non-finite", "flipped-bytes"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_is_skipped_with_one_line_and_the_next_loads(
    trained: dict[str, Path], tmp_path: Path, how: str, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = copy_run(trained, tmp_path)
    checkpoints = CheckpointDir(run_dir)
    damage(checkpoints.latest, how)
    path, state = checkpoints.load_newest()
    assert path.name == "latest.prev.pt" and state["global_step"] == 6
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("skipping damaged checkpoint latest.pt: "), err
    if how == "flipped-bytes":
        assert "sha256" in err[0]


def test_flipped_tensor_bytes_fail_the_digest(trained: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    shutil.copy(trained["run"] / "checkpoints" / "latest.pt", path)
    load_checkpoint(path)  # intact: loads
    flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(ValueError, match="fails its sha256 check"):
        load_checkpoint(path)


def test_resume_auto_over_a_zero_byte_latest_continues_from_the_previous(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"")
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 0
    assert [line for line in err if line.startswith("skipping")] == [
        "skipping damaged checkpoint latest.pt: ValueError: latest.pt is empty (0 bytes)"
    ]
    assert any("resumed from" in line and "latest.prev.pt at step 6" in line for line in err)
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["global_step"] == 8


@pytest.mark.parametrize("how", ["zero-bytes", "truncated", "flipped-bytes"])
def test_resume_from_a_damaged_path_is_one_line_exit_2(
    trained: dict[str, Path], tmp_path: Path, how: str, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    bad = run_dir / "checkpoints" / "epoch_0001.pt"
    damage(bad, how)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec, "--resume", bad)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"--resume: {bad} cannot be loaded ("), err
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- 3: none loads -> refuse, change nothing


def test_every_checkpoint_damaged_refuses_and_changes_nothing(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    for path, how in zip(sorted((run_dir / "checkpoints").glob("*.pt")), DAMAGES):
        damage(path, how)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 2
    assert err[0].startswith(f"--resume auto: none of the {len(names)} checkpoint(s) in ") and "refusing" in err[0]
    assert sorted(line.split(":")[0].strip() for line in err[1:]) == names  # one line per file, with why
    assert snapshot(run_dir) == before


def test_a_fresh_start_over_an_existing_run_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec)
    assert code == 2 and len(err) == 1 and "already holds checkpoints" in err[0] and "--resume auto" in err[0]
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- 2: the run-folder lock


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Any]:
    """Start a process that holds the lock of a folder (optionally as SLURM job JOB) until killed."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path, job: str = "") -> subprocess.Popen:
        code = (
            "import sys, time; from pathlib import Path; from neuromf.train.lock import RunLock; "
            "RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
        )
        env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
        if job:
            env["SLURM_JOB_ID"] = job
        proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_trainer_on_a_locked_run_exits_2_naming_the_holder(
    trained: dict[str, Path], tmp_path: Path, lock_holder: Any, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    holder = lock_holder(run_dir)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 2 and len(err) == 1, err
    assert "in use by another trainer" in err[0] and f"PID {holder.pid} on " in err[0]
    assert snapshot(run_dir) == before
    # the holder dies (its .lock file stays): the folder is free again
    holder.kill()
    holder.wait()
    assert (run_dir / ".lock").exists()
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 0, err


def test_a_lock_of_the_same_slurm_job_is_taken_over(
    tmp_path: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    lock_holder(run_dir, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(UserError, match="SLURM job 4242"):
        RunLock.acquire(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the requeued job itself
    lock = RunLock.acquire(run_dir)
    assert "taking over" in capsys.readouterr().out
    assert '"slurm_job_id": "4242"' in (run_dir / ".lock").read_text()
    lock.release()


# ---------------------------------------------------------------- 5: disk full


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(size_bytes) -> a fresh tmpfs of that size (needs root: skipped where mounting is not possible)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"full{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_checkpoint_save_on_a_full_disk_is_one_line_and_keeps_the_previous(small_tmpfs: Any) -> None:
    checkpoints = CheckpointDir(small_tmpfs(2 << 20))
    small = {"format": FORMAT, "global_step": 1, "w": torch.zeros(50_000)}  # 200 kB
    checkpoints.save_latest(small)
    with pytest.raises(UserError) as caught:
        checkpoints.save_latest({"format": FORMAT, "global_step": 2, "w": torch.zeros(1_000_000)})  # 4 MB
    [line] = caught.value.problems
    assert "cannot write (No space left on device); " in line and str(checkpoints.folder) in line
    assert load_checkpoint(checkpoints.latest)["global_step"] == 1
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["latest.pt"]  # no temporary left


def test_training_onto_a_full_disk_exits_2_with_the_last_checkpoint_intact(
    trained: dict[str, Path], tmp_path: Path, small_tmpfs: Any, capsys: pytest.CaptureFixture
) -> None:
    size = (trained["run"] / "checkpoints" / "latest.pt").stat().st_size
    run_dir = small_tmpfs(size * 3 // 2 + (256 << 10)) / "run"  # room for one checkpoint (and the log), not two
    raw = tiny_run_raw(trained["latents"], run_dir, 40)
    raw["data"]["shard"] = str(tmp_path / "latents.h5")  # the data elsewhere: only the run fills the disk
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(raw))
    code, err = run_cli(capsys, "train", spec)
    assert code == 2
    assert [line for line in err if "cannot write" in line] == [err[-1]]
    assert err[-1].startswith(str(run_dir)) and "cannot write (No space left on device)" in err[-1]
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert 2 <= state["global_step"] < 40
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- 7: read-only run folder, as a non-root user


def as_other_user(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m neuromf ARGV` as uid 1000 when we are root (root ignores permissions), else as ourselves."""
    cmd = [sys.executable, "-m", "neuromf", *argv]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop to a non-root user")
        cmd = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", *cmd]
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=home, timeout=300)


@pytest.fixture
def read_only_run(trained: dict[str, Path]) -> Iterator[tuple[Path, Path, Path]]:
    """(run_dir, spec, home): a copy of the run that the test user cannot write, outside root's private /tmp folder."""
    base = Path(tempfile.mkdtemp(prefix="neuromf-readonly-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir()
        if os.geteuid() == 0:
            os.chown(home, 1000, 1000)
        run_dir, spec = copy_run(trained, base, latents=True)
        for path in [run_dir, *run_dir.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        yield run_dir, spec, home
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("verb", ["train", "evaluate", "verify"])
def test_a_read_only_run_folder_is_refused_before_any_work(read_only_run: tuple[Path, Path, Path], verb: str) -> None:
    run_dir, spec, home = read_only_run
    before = snapshot(run_dir)
    argv = {
        "train": ["train", str(spec), "--resume", "auto"],
        "evaluate": ["evaluate", str(run_dir), "--n", "2"],
        "verify": ["verify", str(run_dir), "--n", "2"],
    }[verb]
    done = as_other_user(argv, home)
    assert done.returncode == 2, done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "not writable" in err[0] or "cannot write" in err[0]
    assert str(run_dir) in err[0]
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- 8, 9: run-spec values and YAML


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.num_head_channels=[0,0,0,0]", "model.num_head_channels: "),
        ("training.lr=.inf", "training.lr: "),
        ("time_sampling.mu=.nan", "time_sampling.mu: "),
        ("time_sampling.sigma=.inf", "time_sampling.sigma: "),
        ("sampling.n_samples=1000000000000", "sampling.n_samples: "),
        ("training.seed=100000000000000000000000", "training.seed: "),
        ("sampling.seed=-1", "sampling.seed: "),
        ("hardware.num_threads=100000000000000000000", "hardware.num_threads: "),
        ("training.max_steps=true", "training.max_steps: expected a number, got a boolean"),
        ("training.compile=1", "training.compile: expected true or false"),
    ],
)
def test_validate_rejects_values_that_would_crash_later(
    override: str, field: str, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_cli(capsys, "validate", RUNSPEC, "--set", override)
    assert code == 2 and len(err) == 1 and err[0].startswith(field), err


BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10 if p else ['x'] * 10)}]\n"
    for p, c in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")
)


@pytest.mark.parametrize(
    "text, message",
    [
        (BOMB, "once aliases are expanded"),
        (
            "training:\n  lr: 1.0e-3\n  lr: 7.0\n",
            "YAML error at line 3, column 3: duplicate key 'lr' (first on line 2)",
        ),
        ("training: " + "[" * 200 + "]" * 200 + "\n", "line 1: nesting deeper than 32 levels"),
        ("x: [" + ",".join(["1"] * 600_000) + "]\n", "bytes; a run-spec is at most"),
    ],
)
def test_hostile_yaml_is_one_line_quickly(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{path}: ") and message in err[0], err


def test_an_alias_bomb_through_set_is_one_line(capsys: pytest.CaptureFixture) -> None:
    value = "{" + BOMB.strip().replace("\n", ", ") + "}"
    code, err = run_cli(capsys, "validate", RUNSPEC, "--set", f"name={value}")
    assert code == 2 and len(err) == 1 and err[0].startswith("name: --set value: line 1: ") and "aliases" in err[0], err


# ---------------------------------------------------------------- 10: temporaries of killed writes


def test_temporaries_of_dead_writers_are_removed_at_the_next_start(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, spec = copy_run(trained, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            run_dir / "checkpoints" / f".latest.staged.pt.tmp-{dead.pid}",
            run_dir / "samples" / "epoch_1" / f".ema_nfe1_grid.png.tmp-{dead.pid}",
            run_dir / f".training_log.json.tmp-{dead.pid}",
        ]
        live = run_dir / "checkpoints" / f".epoch_0003.pt.tmp-{alive.pid}"
        other = run_dir / "checkpoints" / "notes.tmp-1"  # not one of ours
        for path in [*stale, live, other]:
            path.write_bytes(b"partial")
        code, err = run_cli(capsys, "train", spec, "--resume", "auto")
        assert code == 0, err
        assert not any(p.exists() for p in stale)
        assert live.exists() and other.exists()
        assert sum(line.startswith("removed ") for line in err) == len(stale)
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- 11: a refused resume changes nothing


def test_a_resume_on_changed_latents_is_refused_before_repacking(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = copy_run(trained, tmp_path, latents=True)
    latent_dir = tmp_path / "latents"
    first = sorted(latent_dir.glob("*.pt"))[0]
    shutil.copy(first, latent_dir / "zz_new_subject.pt")  # a latent added after the run started
    spec = write_spec(latent_dir, run_dir, 12)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"--resume: the latents in {latent_dir}"), err
    assert snapshot(run_dir) == before  # the shard (in the run folder) was not repacked


def test_a_resume_with_another_split_is_refused_and_changes_nothing(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = copy_run(trained, tmp_path)
    spec = write_spec(trained["latents"], run_dir, 12, data={"val_fraction": 0.5})
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", spec, "--resume", "auto")
    assert code == 2 and len(err) == 1 and "data.val_fraction = 0.25, now 0.5" in err[0], err
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- 12: stop signals during validation / sampling


def signal_self_on_first_call(fn: Any) -> Any:
    """`fn`, but its first call first sends this process a real SIGTERM."""
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("during", ["validation", "sampling"])
def test_a_stop_signal_interrupts_the_epoch_end_which_the_resume_redoes(
    trained: dict[str, Path], tmp_path: Path, during: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    spec = runspec_from_dict(tiny_run_raw(trained["latents"], run_dir, 8), base_dir=tmp_path)
    trainer = Trainer(spec)
    if during == "validation":
        trainer.val_batches.numbered = signal_self_on_first_call(trainer.val_batches.numbered)  # type: ignore[union-attr]
    else:
        import neuromf.train.sample_files as samples

        monkeypatch.setattr(samples, "write_sample_set", signal_self_on_first_call(samples.write_sample_set))
    assert trainer.run() == REQUEUE_EXIT_CODE
    trainer.run_lock.release()
    saved = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert saved["global_step"] == 4 and saved["progress"]["pending_epoch_end"] == 1
    log = [yaml.safe_load(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert any("SIGTERM: saved" in r.get("event", "") and "redone on resume" in r["event"] for r in log)
    if during == "validation":
        assert not any("val/mse_total" in r for r in log)
    monkeypatch.undo()
    assert train(spec, resume="auto") == 0
    log = [yaml.safe_load(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val/mse_total" in r] == [1, 2]
    for epoch in (1, 2):
        folder = run_dir / "samples" / f"epoch_{epoch}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in (trained["run"] / "samples" / f"epoch_{epoch}").iterdir()
        )
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["global_step"] == 8


@pytest.mark.slow
def test_a_sigkill_during_sample_writing_resumes_to_complete_samples(trained: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = write_spec(trained["latents"], run_dir, 8, sampling={"n_samples": 48})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuromf", "train", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = run_dir / "samples" / "epoch_1"
    deadline = time.time() + 300
    while not folder.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # well inside the 4 sets x 48 volumes
    proc.kill()
    proc.wait()
    resumed = subprocess.run(
        [sys.executable, "-m", "neuromf", "train", str(spec), "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    from neuromf.train.sample_files import sample_paths

    for label in ("ema_nfe1", "ema_nfe2", "online_nfe1", "online_nfe2"):
        paths = sample_paths(folder, label, 48)
        assert all(p.is_file() for p in paths.values())
        assert torch.load(paths["latents"], weights_only=True).shape[0] == 48
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]
