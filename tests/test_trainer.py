"""The trainer: the plan's eight trainer tests under their original names (docs/design.md, 'Where the names come from'), exact resume, signals, NaN steps, outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from neuromf.cli import main
from neuromf.data.demo import build_demo_dataset
from neuromf.model.unet import perturb_zero_init
from neuromf.spec import RunSpec, runspec_from_dict
from neuromf.train.checkpoint import load_checkpoint
from neuromf.train.loop import Trainer, train
from neuromf.train.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 demo volumes at 16^3 (21 train / 3 val, by the subject split; no test split): 5 steps of 4 per epoch."""
    return build_demo_dataset(tmp_path_factory.mktemp("latents") / "demo", n_volumes=24, size=16, seed=0)


def tiny_raw(latent_dir: Path, run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "tiny",
        "model": {
            "spatial_size": [16, 16, 16],
            "channels": [8, 16, 32, 64],
            "attention_levels": [False, False, True, True],
            "num_head_channels": [0, 0, 8, 8],
            "num_res_blocks": 1,
            "norm_num_groups": 4,
        },
        "training": {
            "lr": 1e-3,
            "warmup_steps": 2,
            "max_steps": 12,
            "batch_size": 4,
            "precision": "fp32",
            "compile": False,
            "deterministic": True,
        },
        "ema": {"decay": 0.9},
        "data": {
            "source": "shard",
            "latent_dir": str(latent_dir),
            "shard": str(run_dir / "latents.h5"),
            "test_fraction": 0.0,
        },
        "hardware": {"device": "cpu", "num_threads": 1},
        "paths": {"run_dir": str(run_dir)},
        "checkpoint": {"save_every_n_epochs": 1, "latest_every_n_steps": 2, "keep_last": 2},
        "logging": {"log_every_n_steps": 1, "val_every_n_epochs": 1, "progress": "plain"},
        "vae": {"decoder": "identity"},
        "sampling": {"every_n_epochs": 2, "n_samples": 2, "nfe": [1, 2]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_spec(latent_dir: Path, run_dir: Path, **sections: dict[str, Any]) -> RunSpec:
    return runspec_from_dict(tiny_raw(latent_dir, run_dir, **sections), base_dir=run_dir)


def write_spec(latent_dir: Path, run_dir: Path, **sections: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(latent_dir, run_dir, **sections)))
    return path


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict[str, Any]:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------- the plan's eight trainer tests (names kept; docs/design.md, 'Where the names come from')


def test_lightning_module_init(latent_dir: Path, tmp_path: Path) -> None:
    """(seed name kept) The trainer builds model, loss, EMA, optimizer and data from a tiny spec."""
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run"))
    assert trainer.steps_per_epoch == 5 and trainer.total_steps == 12
    assert sum(p.numel() for p in trainer.net.parameters()) > 10_000
    assert trainer.batches.next_batch().shape == (4, 4, 16, 16, 16)


def test_training_step_runs(latent_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run"))
    applied, metrics = trainer.train_step(trainer.batches.next_batch())
    assert applied and math.isfinite(float(metrics["loss_total"])) and float(metrics["grad_norm"]) > 0


def test_training_step_gradients_flow(latent_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run"))
    perturb_zero_init(trainer.net, generator=torch.Generator().manual_seed(0))  # MONAI zero-inits output convs
    trainer.train_step(trainer.batches.next_batch())  # the gradients stay until the next step zeroes them
    missing = [
        n
        for n, p in trainer.net.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []


def test_ema_updates(latent_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run"))
    start = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    for _ in range(5):
        trainer.train_step(trainer.batches.next_batch())  # AdamW, then the EMA update
    ema, online = trainer.ema.state_dict(), trainer.net.state_dict()
    moved = [k for k in ema if not torch.equal(ema[k], start[k])]
    assert moved, "EMA did not move"
    assert any(not torch.equal(ema[k], online[k]) for k in moved), "EMA equals the online weights"


def test_checkpoint_save_load(latent_dir: Path, tmp_path: Path) -> None:
    spec = tiny_spec(latent_dir, tmp_path / "run")
    trainer = Trainer(spec)
    for _ in range(3):
        trainer.train_step(trainer.batches.next_batch())  # AdamW, schedule, EMA, global_step
    path = trainer.save_latest()
    trainer.log.close()
    restored = Trainer(spec, resume=str(path))
    assert restored.progress.global_step == 3
    assert_states_equal(trainer.net.state_dict(), restored.net.state_dict())
    assert_states_equal(trainer.ema.state_dict(), restored.ema.state_dict())
    assert trainer.batches.state_dict() == restored.batches.state_dict()
    state = load_checkpoint(path)
    for key in (
        "epoch",
        "global_step",
        "model_state_dict",
        "ema_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "config",
        "loss_history",
        "rng",
        "data_state",
    ):
        assert key in state, key
    assert RunSpec.model_validate(state["config"]) == spec


def test_resume_loss_continuity(latent_dir: Path, tmp_path: Path) -> None:
    """A resumed run's next step has the same loss as the uninterrupted run's (here: exactly)."""
    spec = tiny_spec(latent_dir, tmp_path / "run")
    trainer = Trainer(spec)
    for _ in range(3):
        trainer.train_step(trainer.batches.next_batch())
    path = trainer.save_latest()
    _, uninterrupted = trainer.train_step(trainer.batches.next_batch())
    trainer.log.close()
    resumed = Trainer(spec, resume=str(path))
    _, after_resume = resumed.train_step(resumed.batches.next_batch())
    assert float(after_resume["loss_total"]) == pytest.approx(float(uninterrupted["loss_total"]), rel=1e-6)


def test_sample_generation_shape(latent_dir: Path, tmp_path: Path) -> None:
    """Periodic samples with the identity decoder (the demo's): latents, grids and volumes of the right shape."""
    import nibabel as nib

    from neuromf.train.epoch_samples import write_periodic_samples

    spec = tiny_spec(latent_dir, tmp_path / "run")
    trainer = Trainer(spec)
    folder = write_periodic_samples(
        spec, {"ema": trainer.ema_net, "online": trainer.net}, trainer.data.stats, 7, trainer.device
    )
    assert folder == spec.paths.run_dir / "samples" / "epoch_7"
    for label in ("ema_nfe1", "ema_nfe2", "online_nfe1", "online_nfe2"):
        latents = torch.load(folder / f"{label}_latents.pt", weights_only=True)
        assert latents.shape == (2, 4, 16, 16, 16) and torch.isfinite(latents).all()
        assert (folder / f"{label}_grid.png").stat().st_size > 0
        assert nib.load(folder / f"{label}_sample_01.nii.gz").shape[:3] == (16, 16, 16)


def test_cli_dry_run(latent_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(latent_dir, tmp_path / "run")
    assert main(["train", str(spec), "--dry-run"]) == 0
    assert "dry run: one step done" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- a whole short run


def test_short_run_writes_documented_outputs(latent_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(tiny_spec(latent_dir, run_dir)) == 0
    log = read_log(run_dir)
    steps = [r for r in log if "train/loss_total" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in (
        "train/loss_total",
        "train/loss_fm",
        "train/loss_mf",
        "train/mse_fm",
        "train/mse_mf",
        "train/grad_norm",
        "train/lr",
        "train/latents_per_s",
    ):
        assert key in steps[-1], key
    vals = [r for r in log if "val/mse_total" in r]
    assert [r["epoch"] for r in vals] == [1, 2, 3]  # epochs 1, 2 and the final partial one
    for key in ("val/loss_total", "val/loss_fm", "val/loss_mf", "val_online/loss_total"):
        assert key in vals[0]
    summary = json.loads((run_dir / "training_log.json").read_text())
    assert len(summary["train"]) == 12 and len(summary["val"]) == 3
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "latest.prev.pt", "latest.pt"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_2", "epoch_3"]
    state = final_state(run_dir)
    assert state["global_step"] == 12 and state["epoch"] == 2  # completed epochs
    assert [h["epoch"] for h in state["loss_history"]["train"]] == [1, 2]
    assert len(state["loss_history"]["val"]) == 3

    # Run again with --resume auto (a second `make demo`, a requeue after the end): nothing more is done or written.
    log_before = (run_dir / "training_log.jsonl").read_text()
    assert train(tiny_spec(latent_dir, run_dir), resume="auto") == 0
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_2", "epoch_3"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ckpts
    assert (run_dir / "training_log.jsonl").read_text().startswith(log_before)
    assert not [r for r in read_log(run_dir)[len(log) :] if "val/mse_total" in r or "train/loss_total" in r]


def test_resume_auto_without_checkpoint_starts_fresh(
    latent_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run"), resume="auto")
    assert trainer.progress.global_step == 0
    assert "no checkpoint to resume from: starting fresh" in capsys.readouterr().out


def test_resume_from_a_missing_path_is_a_clear_error(
    latent_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_spec(latent_dir, tmp_path / "run")
    assert main(["train", str(spec), "--resume", str(tmp_path / "nope.pt")]) == 2
    assert "--resume: " in capsys.readouterr().err


def test_a_failed_compile_is_said_once_and_the_step_is_redone_eagerly(latent_dir: Path, tmp_path: Path) -> None:
    """A torch.compile that fails at the first step (e.g. no C compiler) costs the run nothing: one event,
    then the same step eagerly, with the same result as a run that never compiled."""
    spec = tiny_spec(latent_dir, tmp_path / "run")
    eager = Trainer(spec)
    _, expected = eager.train_step(eager.batches.next_batch())
    eager.log.close()
    trainer = Trainer(tiny_spec(latent_dir, tmp_path / "run2"))

    def failed_compile(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(more lines)")

    trainer.compute = failed_compile
    applied, metrics = trainer._train_step_or_eager(trainer.batches.next_batch())
    assert applied and trainer.compute == trainer.loss.compute and trainer.progress.global_step == 1
    assert float(metrics["loss_total"]) == float(expected["loss_total"])
    trainer._train_step_or_eager(trainer.batches.next_batch())
    trainer.log.close()
    events = [r["event"] for r in read_log(tmp_path / "run2") if "event" in r]
    assert events == [
        "torch.compile failed (RuntimeError: InductorError: CppCompileError: C++ compile error); falling back to eager"
    ]


# ---------------------------------------------------------------- NaN / Inf


def poison(trainer: Trainer, bad_calls: set[int]) -> None:
    real = trainer.batches.next_batch
    calls = {"n": 0}

    def next_batch() -> torch.Tensor:
        calls["n"] += 1
        batch = real()
        return torch.full_like(batch, math.nan) if calls["n"] in bad_calls else batch

    trainer.batches.next_batch = next_batch  # type: ignore[method-assign]


def test_a_poisoned_batch_is_skipped_and_logged(latent_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_spec(latent_dir, run_dir))
    poison(trainer, {4})
    assert trainer.run() == 0
    assert trainer.progress.bad_steps == 1 and trainer.progress.global_step == 12
    assert [r for r in read_log(run_dir) if r.get("bad_step")][0]["step"] == 3
    for name in ("model_state_dict", "ema_state_dict"):
        assert all(torch.isfinite(v).all() for v in final_state(run_dir)[name].values())


def test_consecutive_bad_steps_stop_the_run(latent_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = tiny_spec(latent_dir, run_dir, training={"max_bad_steps": 3})
    trainer = Trainer(spec)
    poison(trainer, {3, 4, 5, 6, 7})
    from neuromf.train.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="3 consecutive steps with NaN/Inf"):
        trainer.run()
    state = final_state(run_dir)  # latest.pt of step 2: finite
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values())


# ---------------------------------------------------------------- processes: signals and SIGKILL


def start_training(spec: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "neuromf", "train", str(spec), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    log = run_dir / "training_log.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "trainer exited"
        if log.exists() and any(
            json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines() if line.strip()
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_exact_resume_after_sigkill(latent_dir: Path, tmp_path: Path) -> None:
    """N steps in one go == the same N steps killed (SIGKILL) after a checkpoint and resumed: bit-identical."""
    straight = write_spec(latent_dir, tmp_path / "straight", training={"max_steps": 14})
    assert (
        subprocess.run([sys.executable, "-m", "neuromf", "train", str(straight)], capture_output=True).returncode == 0
    )

    killed_dir = tmp_path / "killed"
    killed = write_spec(latent_dir, killed_dir, training={"max_steps": 14})
    proc = start_training(killed, "--resume", "auto")
    wait_for_step(killed_dir, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed_dir / "checkpoints" / "latest.pt")["global_step"] < 14
    resumed = subprocess.run(
        [sys.executable, "-m", "neuromf", "train", str(killed), "--resume", "auto"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    a, b = final_state(tmp_path / "straight"), final_state(killed_dir)
    assert a["global_step"] == b["global_step"] == 14
    assert_states_equal(a["model_state_dict"], b["model_state_dict"])
    assert_states_equal(a["ema_state_dict"], b["ema_state_dict"])
    steps_a = [r["train/loss_total"] for r in read_log(tmp_path / "straight") if "train/loss_total" in r]
    steps_b = [r["train/loss_total"] for r in read_log(killed_dir) if "train/loss_total" in r]
    assert steps_a == steps_b  # the log of the resumed run is cut back and continues seamlessly


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes(latent_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = write_spec(latent_dir, run_dir, training={"max_steps": 40}, checkpoint={"latest_every_n_steps": 1000})
    proc = start_training(spec, "--resume", "auto")
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    assert "SIGTERM" in output
    saved = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["global_step"]
    assert 3 <= saved < 40
    events = [r["event"] for r in read_log(run_dir) if "event" in r]
    assert any("SIGTERM: saved" in e for e in events)
    resumed = subprocess.run(
        [sys.executable, "-m", "neuromf", "train", str(spec), "--resume", "auto"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and f"at step {saved}" in resumed.stderr
    assert final_state(run_dir)["global_step"] == 40
