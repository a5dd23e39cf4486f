"""The progress line: the training MSEs and the speed, not the adaptive loss that sits near 1 + lambda_mf."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuromf.spec import RunSpec
from neuromf.train.run_log import RunLog


def test_progress_line_shows_the_mses_and_speed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = RunSpec(paths={"run_dir": tmp_path}, logging={"progress": "plain"}, meanflow={"lambda_mf": 0.5})
    log = RunLog(spec, total_steps=100, start_step=0, resumed=False)
    metrics = {"train/loss_total": 1.9987, "train/mse_fm": 0.4321, "train/mse_mf": 0.8}
    log.progress(5, 1, metrics, printed=False)  # not a logging step: nothing printed
    assert capsys.readouterr().err == ""
    log.progress(10, 1, metrics, printed=True)
    log.close()
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 10/100 | epoch 1 | mse_fm 0.4321 | mse_mf 0.8 | mse_total 0.8321 | ")
    assert "loss" not in line
    assert re.search(r"\| \d+\.\d\d it/s \| ETA (\d+m\d\ds|\?)$", line), line


def test_progress_line_without_a_mean_flow_term(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A flow-matching-only loss has no mse_mf: the line shows mse_fm and no made-up total."""
    spec = RunSpec(paths={"run_dir": tmp_path}, logging={"progress": "plain"})
    log = RunLog(spec, total_steps=100, start_step=0, resumed=False)
    log.progress(10, 1, {"train/loss_total": 1.0, "train/mse_fm": 0.25}, printed=True)
    log.close()
    line = capsys.readouterr().err
    assert "| mse_fm 0.25 | " in line and "mse_mf" not in line and "mse_total" not in line
