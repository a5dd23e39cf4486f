"""A real, short training run shared by test_evaluation.py and test_verify.py (built once per pytest session).

Tiny MAISI UNet on 24 demo volumes at 16^3 (17 train / 6 val / 1 test), batch 4
(4 steps per epoch): 6 steps, then resumed to 12 steps (3 epochs), so the log
has a real "resumed from ... at step 6" event. Samples every epoch, EMA and
online, NFE 1 and 2. The spec is a minimal copy of test_trainer.py's tiny_raw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from neuromf.data.demo import build_demo_dataset
from neuromf.spec import RunSpec, runspec_from_dict

MARKER = "tiny_run_done.json"


def tiny_run_raw(latent_dir: Path, run_dir: Path, max_steps: int) -> dict[str, Any]:
    return {
        "name": "tiny-eval",
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
            "max_steps": max_steps,
            "batch_size": 4,
            "precision": "fp32",
            "compile": False,
        },
        "ema": {"decay": 0.9},
        "data": {
            "source": "shard",
            "latent_dir": str(latent_dir),
            "shard": str(run_dir / "latents.h5"),
            "val_fraction": 0.25,
        },
        "hardware": {"device": "cpu", "num_threads": 1},
        "paths": {"run_dir": str(run_dir)},
        "checkpoint": {"save_every_n_epochs": 1, "latest_every_n_steps": 2, "keep_last": 2},
        "logging": {"log_every_n_steps": 1, "val_every_n_epochs": 1, "progress": "plain"},
        "vae": {"decoder": "identity"},
        "sampling": {"every_n_epochs": 1, "n_samples": 2, "nfe": [1, 2], "weights": ["ema", "online"]},
    }


def tiny_run_spec(latent_dir: Path, run_dir: Path, max_steps: int) -> RunSpec:
    return runspec_from_dict(tiny_run_raw(latent_dir, run_dir, max_steps), base_dir=run_dir.parent)


def build_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder; trained on first use in the session, reused afterwards."""
    from neuromf.train.loop import train

    base = tmp_path_factory.getbasetemp() / "eval_tiny"
    run_dir = base / "run"
    if (base / MARKER).exists():
        return run_dir
    latent_dir = build_demo_dataset(base / "latents", n_volumes=24, size=16, seed=0)
    assert train(tiny_run_spec(latent_dir, run_dir, 6)) == 0
    assert train(tiny_run_spec(latent_dir, run_dir, 12), resume="auto") == 0
    (base / MARKER).write_text(json.dumps({"latent_dir": str(latent_dir)}))
    return run_dir
