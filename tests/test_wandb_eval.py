"""Training with wandb offline and periodic evaluation: sample grids reach the offline run as images, the
small-N FID of the EMA weights is logged as eval/fid_*, and a resumed (requeued) job keeps the same wandb run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_run import tiny_run_raw
from test_extractors import save_medicalnet

from neuromf.data.demo import build_demo_dataset
from neuromf.spec import runspec_from_dict


@pytest.mark.slow
def test_wandb_offline_images_and_periodic_fid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuromf.train.loop import train

    monkeypatch.setenv("WANDB_SILENT", "true")
    latent_dir = build_demo_dataset(tmp_path / "latents", n_volumes=24, size=16, seed=0)
    weights = tmp_path / "resnet_50_23dataset.pth"
    save_medicalnet(weights)
    run_dir = tmp_path / "run"

    def spec(max_steps: int):  # noqa: ANN202
        raw = tiny_run_raw(latent_dir, run_dir, max_steps)
        raw["logging"].update(wandb=True, wandb_mode="offline", wandb_project="neuromf-test")
        raw["sampling"].update(nfe=[1], weights=["ema"])
        raw["evaluation"] = {"features": "medicalnet3d", "weights": str(weights), "every_n_epochs": 1, "periodic_n": 4}
        return runspec_from_dict(raw, base_dir=tmp_path)

    assert train(spec(4)) == 0  # one epoch of 4 steps
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert train(spec(8), resume="auto") == 0  # a requeued job: the same wandb run continues
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id

    records = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fid_ema_nfe1" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and all(
        r["eval/fid_ema_nfe1"] >= 0 and r["eval/n"] == 4 for r in evals
    )
    assert evals[0]["eval_features"].startswith("medicalnet3d (image space) vs val")

    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline)  # one id for both jobs
    images = sorted(p.name for d in offline for p in (d / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2 and all(name.startswith("ema_nfe1") for name in images)  # one grid per epoch
    stream = b"".join((d / f"run-{run_id}.wandb").read_bytes() for d in offline)
    assert b"samples/ema_nfe1" in stream and b"eval/fid_ema_nfe1" in stream and b"image-file" in stream

    # `neuromf evaluate` puts its numbers into the same wandb run's summary.
    from neuromf.cli import main

    assert (
        main(
            [
                "evaluate",
                str(run_dir),
                "--features",
                "medicalnet3d",
                "--weights",
                str(weights),
                "--nfe",
                "1",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3 and all(d.name.endswith(f"-{run_id}") for d in offline)
    assert b"evaluate/fid_ema_nfe1" in (offline[-1] / f"run-{run_id}.wandb").read_bytes()
