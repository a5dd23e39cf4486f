"""EMA, LR schedule, checkpoint files and the run log, each on its own."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from neuromf.spec import RunSpec
from neuromf.spec.schema import TrainingSpec
from neuromf.train.checkpoint import (
    FORMAT,
    RESUME_KEYS,
    CheckpointDir,
    assert_finite,
    capture_rng_states,
    load_checkpoint,
    restore_rng_states,
)
from neuromf.train.ema import EMA, decay_for_half_life
from neuromf.train.run_log import RunLog
from neuromf.train.schedule import lr_factor


def test_ema_follows_the_closed_form() -> None:
    net = torch.nn.Linear(3, 2)
    start = net.weight.detach().clone()
    ema = EMA(net, decay=0.9, half_lives=[10])
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(5):
        ema.update(net)
    expected = 0.9**5 * start + (1 - 0.9**5) * torch.ones_like(start)
    torch.testing.assert_close(ema.state_dict()["weight"], expected)
    h = ema.full_state_dict()["ema_h10"]["weight"]
    d = decay_for_half_life(10)
    torch.testing.assert_close(h, d**5 * start + (1 - d**5) * torch.ones_like(start))
    assert decay_for_half_life(10) ** 10 == pytest.approx(0.5)


def test_ema_is_fp32_and_loads_into_the_frozen_copy() -> None:
    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(net)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
    # what the trainer does: a frozen copy of the network, loaded with the averages before validation and samples
    online = torch.nn.Linear(3, 2)
    ema = EMA(online)
    ema_net = copy.deepcopy(online).eval().requires_grad_(False)
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online)
    ema_net.load_state_dict(ema.state_dict(), strict=False)
    assert torch.equal(ema_net.weight, ema.state_dict()["weight"]) and not torch.equal(ema_net.weight, online.weight)
    assert not any(p.requires_grad for p in ema_net.parameters())


def test_warmup_then_cosine() -> None:
    spec = TrainingSpec(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    factors = [lr_factor(s, 110, spec) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # falling after
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)
    assert lr_factor(110, 110, spec) == pytest.approx(0.1)


def test_rng_states_round_trip_and_load_with_weights_only(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    state = capture_rng_states({"loss": g})
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    torch.save({"format": "neuromf-checkpoint-v1", "rng": state}, tmp_path / "x.pt")
    loaded = load_checkpoint(tmp_path / "x.pt")  # weights_only=True inside
    restore_rng_states(loaded["rng"], {"loss": g})
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    torch.testing.assert_close(expected[0], again[0])
    np.testing.assert_array_equal(expected[1], again[1])
    assert expected[2] == again[2]
    torch.testing.assert_close(expected[3], again[3])


def resumable(step: int) -> dict:
    """The smallest state a resume accepts (every key it reads)."""
    state = {k: {} for k in RESUME_KEYS}
    state.update(format=FORMAT, global_step=step, model_state_dict={"w": torch.full((100,), float(step))})
    return state


def test_checkpoint_rotation_and_damaged_newest_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    for step in range(1, 4):
        ckpts.save_latest(resumable(step))
    for epoch in range(1, 5):
        ckpts.save_epoch(resumable(0), epoch)
    names = sorted(p.name for p in ckpts.folder.iterdir())
    assert names == ["epoch_0003.pt", "epoch_0004.pt", "latest.prev.pt", "latest.pt"]  # nothing temporary left
    # make latest.pt the newest and damage it: resume must fall back to the next newest complete file
    data = ckpts.latest.read_bytes()
    ckpts.latest.write_bytes(data[: len(data) // 2])
    path, state = ckpts.load_newest()
    assert path.name == "latest.prev.pt" and state["global_step"] == 2
    assert "skipping damaged checkpoint latest.pt: " in capsys.readouterr().err


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert CheckpointDir(tmp_path).load_newest() is None


def test_non_finite_state_is_refused() -> None:
    with pytest.raises(RuntimeError, match="w.*NaN or Inf"):
        assert_finite({"w": torch.tensor([1.0, math.nan])}, "model")


def test_run_log_truncates_to_the_resume_step(tmp_path: Path) -> None:
    spec = RunSpec(paths={"run_dir": tmp_path}, logging={"progress": "plain"})
    log = RunLog(spec, total_steps=10, start_step=0, resumed=False)
    for step in range(1, 7):
        log.log({"step": step, "train/loss_total": 1.0 / step})
    log.log({"step": 6, "val/mse_total": 0.5})
    log.log({"step": 6, "train/loss_total": math.nan})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert lines[-1]["train/loss_total"] == "nan"  # JSON has no NaN; kept visible as a string
    resumed = RunLog(spec, total_steps=10, start_step=4, resumed=True)
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "training_log.json").read_text())
    assert [r["step"] for r in summary["train"]] == [1, 2, 3, 4] and summary["val"] == []


def test_precision_is_decided_from_the_resolved_device() -> None:
    """bf16 autocast only on a GPU: `device: auto` + the default bf16 on a CPU-only machine runs fp32."""
    from neuromf.device import autocast_dtype

    spec = RunSpec.model_validate({"data": {"source": "demo"}, "hardware": {"device": "auto"}})
    assert spec.training.precision == "bf16"
    assert autocast_dtype(spec, torch.device("cpu")) is None
    assert autocast_dtype(spec, torch.device("cuda")) is torch.bfloat16
    fp32 = RunSpec.model_validate({"data": {"source": "demo"}, "training": {"precision": "fp32"}})
    assert autocast_dtype(fp32, torch.device("cuda")) is None
