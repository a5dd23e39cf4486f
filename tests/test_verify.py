"""`neuromf verify`: the P4-T1..T8 report of a real tiny run (trained, then resumed), and each check's
PASS / FAIL / NEEDS-LOOK logic on hand-made logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny_run import build_tiny_run
from PIL import Image

from neuromf.cli import main
from neuromf.evaluation.checks import (
    check_grids,
    check_loss_decreases,
    check_no_nan,
    check_resume,
    check_started,
    check_statistics,
    epoch_losses,
)
from neuromf.evaluation.report import write_loss_curve

IDS = [f"P4-T{i}" for i in range(1, 9)]


def _copy_run(tmp: Path, src: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("evaluation", "verification_report.*", "loss_curve.png"))
    return dst


@pytest.fixture(scope="module")
def verified(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A copy of the tiny run, verified once: (run folder, exit code, stdout)."""
    import contextlib
    import io

    run = _copy_run(tmp_path_factory.mktemp("verify"), build_tiny_run(tmp_path_factory))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", str(run), "--device", "cpu", "--no-progress"])
    return run, rc, out.getvalue()


def test_verify_writes_the_report_the_json_twin_and_the_loss_curve(verified: tuple[Path, int, str]) -> None:
    run, rc, stdout = verified
    report = json.loads((run / "verification_report.json").read_text())
    assert [t["id"] for t in report["tests"]] == IDS
    assert all(t["status"] in {"PASS", "FAIL", "NEEDS-LOOK"} and t["evidence"] for t in report["tests"])
    assert rc == (1 if report["critical_failed"] else 0)

    md = (run / "verification_report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| P4-T")]
    assert [r.split("|")[1].strip() for r in rows] == IDS  # one line per test, in order
    for row, test in zip(rows, report["tests"]):
        assert f"**{test['status']}**" in row
    assert "![loss curve](loss_curve.png)" in md and "## Latent statistics (P4-T7)" in md
    for line in stdout.splitlines()[:8]:
        assert line.split()[0] in IDS

    curve = np.asarray(Image.open(run / "loss_curve.png").convert("RGB"))
    assert curve.shape[0] > 300 and curve.shape[1] > 600
    assert (np.abs(curve.astype(int) - [255, 127, 14]).sum(-1) < 30).sum() > 20  # the EMA validation line is drawn
    assert (np.abs(curve.astype(int) - [44, 160, 44]).sum(-1) < 30).sum() > 20  # the resume marker / online val line
    assert (run / "evaluation" / "evaluation.json").is_file() and (
        run / "evaluation" / "latent_histograms.png"
    ).is_file()


def test_verify_statuses_on_the_tiny_run(verified: tuple[Path, int, str]) -> None:
    run, _, _ = verified
    tests = {t["id"]: t for t in json.loads((run / "verification_report.json").read_text())["tests"]}
    assert tests["P4-T1"]["status"] == "PASS" and "all 12" in tests["P4-T1"]["evidence"]
    assert tests["P4-T2"]["status"] in {"PASS", "FAIL"} and "epoch 1" in tests["P4-T2"]["evidence"]
    assert tests["P4-T2"]["details"]["later_epoch"] == 3  # nearest logged to 50 in a 3-epoch run
    assert tests["P4-T3"]["status"] == "PASS"
    for tid in ("P4-T4", "P4-T5"):
        assert tests[tid]["status"] == "NEEDS-LOOK" and "visual inspection" in tests[tid]["evidence"]
        assert (run / tests[tid]["details"]["grid"]).is_file() and tests[tid]["details"]["epoch"] == 3
    t6 = tests["P4-T6"]["details"]
    assert tests["P4-T6"]["status"] == ("PASS" if t6["fd_ema"] < t6["fd_online"] else "FAIL") and t6["n"] == 6
    assert len(tests["P4-T7"]["details"]["channels"]) == 4
    assert tests["P4-T8"]["status"] == "PASS" and "step 6 from" in tests["P4-T8"]["evidence"]
    assert tests["P4-T8"]["details"]["resumes"][0]["first_step_after"] == 7


def test_verify_reuses_a_matching_evaluation(verified: tuple[Path, int, str], capsys: pytest.CaptureFixture) -> None:
    run, _, _ = verified
    before = (run / "evaluation" / "evaluation.json").stat().st_mtime_ns
    main(["verify", str(run), "--device", "cpu", "--no-progress"])
    report = json.loads((run / "verification_report.json").read_text())
    assert report["evaluation"]["how"].startswith("reused")
    assert (run / "evaluation" / "evaluation.json").stat().st_mtime_ns == before


def test_verify_without_evaluation_says_needs_look(verified: tuple[Path, int, str], tmp_path: Path) -> None:
    run = _copy_run(tmp_path, verified[0])
    main(["verify", str(run), "--no-evaluate", "--no-progress"])
    tests = {t["id"]: t for t in json.loads((run / "verification_report.json").read_text())["tests"]}
    assert tests["P4-T6"]["status"] == tests["P4-T7"]["status"] == "NEEDS-LOOK"
    assert not (run / "evaluation").exists()


@pytest.mark.parametrize("case", ["empty", "missing", "garbage checkpoint"])
def test_verify_bad_input_exits_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "garbage checkpoint":
        (target / "checkpoints").mkdir(parents=True)
        (target / "checkpoints" / "latest.pt").write_bytes(b"\x00" * 64)
    assert main(["verify", str(target), "--no-progress"]) == 2
    err = capsys.readouterr().err
    expected = {
        "empty": "not a NeuroMF run folder",
        "missing": "no such folder",
        "garbage checkpoint": "cannot be loaded",
    }[case]
    assert expected in err and "Traceback" not in err
    assert not (target / "verification_report.md").exists()


# ---------------------------------------------------------------- the checks on hand-made logs


def _train(step: int, mse: float, epoch: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": epoch,
        "train/loss_total": 1.9,
        "train/mse_fm": mse / 2,
        "train/mse_mf": mse / 2,
        **extra,
    }


def test_check_started() -> None:
    long = [_train(s, 1.0) for s in range(1, 151)]
    assert check_started(long, 150, 1000).status == "PASS"
    short = [_train(s, 1.0) for s in range(1, 31)]
    assert check_started(short, 30, 30).status == "PASS"
    assert check_started(short, 30, 1000).status == "NEEDS-LOOK"
    stopped = short + [{"step": 30, "event": "training stopped: 10 consecutive steps with NaN/Inf loss or gradients"}]
    assert check_started(stopped, 30, 1000).status == "FAIL"
    assert check_started([], 0, 1000).status == "FAIL"


def test_check_loss_decreases_uses_epochs_1_and_50_or_the_nearest() -> None:
    per_epoch = {1: 2.0, 10: 1.5, 50: 1.0, 60: 0.5}
    check = check_loss_decreases(per_epoch, [], 1.0)
    assert check.status == "PASS" and check.details["later_epoch"] == 50 and "epoch 50: 1" in check.evidence
    assert check_loss_decreases({1: 1.0, 2: 1.2}, [], 1.0).status == "FAIL"
    assert check_loss_decreases({1: 1.0}, [], 1.0).status == "NEEDS-LOOK"
    # from a checkpoint's history (mse_fm + lambda * mse_mf) or, failing that, the log's step records
    history = {"train": [{"epoch": 1, "loss_total": 2.0, "mse_fm": 1.0, "mse_mf": 0.5}]}
    assert epoch_losses(history, [], 2.0) == {1: 2.0}
    records = [_train(1, 4.0, epoch=0), _train(2, 2.0, epoch=0), _train(3, 1.0, epoch=1)]
    assert epoch_losses(None, records, 1.0) == {1: 3.0, 2: 1.0}


def test_check_no_nan() -> None:
    clean = [_train(s, 1.0) for s in range(1, 5)]
    assert check_no_nan(clean).status == "PASS"
    bad = clean + [{"step": 4, "event": "skipped a step with NaN/Inf loss or gradients", "bad_step": True}]
    assert check_no_nan(bad).status == "FAIL" and "1 skipped" in check_no_nan(bad).evidence
    nan_logged = clean + [_train(5, 1.0, **{"train/grad_norm": "nan"})]
    assert check_no_nan(nan_logged).status == "FAIL"


def test_check_resume() -> None:
    before = [_train(s, 1.0) for s in range(1, 11)]
    event = [{"step": 10, "event": "resumed from /x/checkpoints/latest.pt at step 10"}]
    good = before + event + [_train(s, 0.9) for s in range(11, 16)]
    assert check_resume(good, 1.0, 1).status == "PASS"
    restarted = before + event + [_train(s, 5.0) for s in range(11, 16)]  # loss back at its initial level
    check = check_resume(restarted, 1.0, 1)
    assert check.status == "FAIL" and "loss jumps" in check.details["resumes"][0]["verdict"]
    gap = before + event + [_train(s, 1.0) for s in range(20, 25)]  # steps lost
    assert check_resume(gap, 1.0, 1).status == "FAIL"
    assert check_resume(gap, 1.0, 10).status == "PASS"  # logging every 10 steps: 20 is the next logged step
    assert check_resume(before, 1.0, 1, "latest.pt loads").status == "NEEDS-LOOK"


def test_check_statistics_tolerances() -> None:
    train = [{"mean": 1.0, "std": 2.0, "skewness": 0.0, "kurtosis": 0.0}]

    def evaluation(mean: float, std: float) -> dict[str, Any]:
        moments = [{"mean": mean, "std": std, "skewness": 0.0, "kurtosis": 0.0}]
        return {
            "training_moments": train,
            "results": [{"weights": "ema", "nfe": 1, "moments": moments, "histogram_overlap": [0.9]}],
        }

    assert check_statistics(evaluation(1.1, 2.1)).status == "PASS"  # 0.05 std off, ratio 1.05
    assert check_statistics(evaluation(1.6, 2.0)).status == "NEEDS-LOOK"  # 0.3 std off
    assert check_statistics(evaluation(1.0, 0.5)).status == "FAIL"  # std ratio 0.25
    assert check_statistics(None).status == "NEEDS-LOOK"


def test_check_grids(tmp_path: Path) -> None:
    assert check_grids(tmp_path, "P4-T4", 50).status == "FAIL"
    for epoch in (10, 40, 60):
        folder = tmp_path / "samples" / f"epoch_{epoch}"
        folder.mkdir(parents=True)
        (folder / "online_nfe1_grid.png").write_bytes(b"png")
        (folder / "ema_nfe1_grid.png").write_bytes(b"png")
    check = check_grids(tmp_path, "P4-T4", 50)
    assert check.status == "NEEDS-LOOK" and check.details == {"grid": "samples/epoch_40/ema_nfe1_grid.png", "epoch": 40}
    assert check_grids(tmp_path, "P4-T5", 200).details["epoch"] == 60


def test_loss_curve_marks_resumes_and_bad_steps(tmp_path: Path) -> None:
    records = [_train(s, 10.0 / s) for s in range(1, 60)]
    records += [{"step": 20, "event": "resumed from x at step 20"}, {"step": 30, "event": "skipped", "bad_step": True}]
    records += [
        {"step": s, "epoch": s // 10, "val/mse_total": 5.0 / s, "val_online/mse_total": 6.0 / s} for s in (10, 30, 50)
    ]
    path = write_loss_curve(records, 1.0, tmp_path / "curve.png", "test")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(img - [214, 39, 40]).sum(-1) < 30).sum() > 20  # a red dashed marker for the bad step
    assert (np.abs(img - [31, 119, 180]).sum(-1) < 30).sum() > 100  # the moving average of the training MSE
