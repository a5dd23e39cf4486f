"""`neuromf doctor`: every check passes on a healthy CPU, and each one can fail and says why in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neuromf.doctor import run_doctor
from neuromf.doctor.context import DoctorContext
from neuromf.doctor.numerics import check_conv3d_bf16, check_forward_bf16, check_jvp
from neuromf.spec import load_runspec

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runspecs" / "demo.yaml"
# Two levels at 8^3 (attention at the second): every kind of layer, seconds per check on a CPU.
TINY = [
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=[0,16]",
    "model.spatial_size=[8,8,8]",
    "data.demo.size=8",
    "data.demo.n_volumes=16",
    "training.batch_size=4",
]


def _spec(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_runspec(DEMO, [*TINY, f"paths.run_dir={tmp_path / 'run'}", *extra])


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuromf", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def _bf16_context(tmp_path: Path) -> DoctorContext:
    """A bf16 run on this CPU: the run-spec refuses bf16 on CPUs (for training), the numerics checks still apply."""
    ctx = DoctorContext.build(_spec(tmp_path))
    ctx.spec = ctx.spec.model_copy(update={"training": ctx.spec.training.model_copy(update={"precision": "bf16"})})
    ctx.dtype = torch.bfloat16
    return ctx


def test_doctor_cli_passes_on_cpu_and_writes_its_report(tmp_path: Path) -> None:
    res = _cli("doctor", str(DEMO), *sum((["--set", s] for s in [*TINY, f"paths.run_dir={tmp_path / 'run'}"]), []))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    for name in ("device", "toolchain", "jvp", "memory", "throughput", "data_residency"):
        assert any(line.startswith(f"PASS {name}: ") for line in lines), (name, res.stdout)
    for name in ("conv3d_bf16", "forward_bf16", "compiled_step"):  # an fp32, eager run
        assert any(line.startswith(f"SKIP {name}: ") for line in lines), (name, res.stdout)
    report = json.loads((tmp_path / "run" / "doctor.json").read_text())
    assert report["ok"] is True and [c["name"] for c in report["checks"]][:2] == ["device", "toolchain"]
    thr = next(c for c in report["checks"] if c["name"] == "throughput")
    assert (
        thr["details"]["total_steps"] == load_runspec(DEMO).training.max_steps and thr["details"]["projected_hours"] > 0
    )
    assert not list((tmp_path / "run").glob(".*tmp*"))  # written atomically: no temporary left


def test_bf16_checks_pass_and_a_wrong_convolution_fails(tmp_path: Path) -> None:
    ctx = _bf16_context(tmp_path)
    good = check_conv3d_bf16(ctx)
    assert good.ok is True and good.details["cases"], good.line()
    assert check_forward_bf16(ctx).ok is True

    def wrong(x, w, b=None, **kw):  # type: ignore[no-untyped-def]
        y = F.conv3d(x, w, b, **kw)
        return y * 1.05 if x.dtype == torch.bfloat16 else y  # 5 % off in bf16 only

    bad = check_conv3d_bf16(ctx, conv=wrong)
    assert bad.ok is False and bad.line().startswith("FAIL conv3d_bf16: bf16 conv3d is wrong: relative error")
    assert "\n" not in bad.line()


def test_bf16_with_device_auto_on_a_cpu_machine_is_checked_as_fp32(tmp_path: Path) -> None:
    """The doctor asks the same question as training: bf16 + device auto without a GPU computes in fp32."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    ctx = DoctorContext.build(_spec(tmp_path, "hardware.device=auto", "training.precision=bf16"))
    assert ctx.device.type == "cpu" and ctx.dtype is None
    assert check_conv3d_bf16(ctx).ok is None and check_forward_bf16(ctx).ok is None  # skipped: nothing runs in bf16
    assert "at fp32" in check_jvp(ctx).summary


def test_a_wrong_jvp_fails(tmp_path: Path) -> None:
    ctx = DoctorContext.build(_spec(tmp_path))
    assert check_jvp(ctx).ok is True
    bad = check_jvp(ctx, du_dt=lambda *a: ctx.loss.du_dt(*a) * 1.05)
    assert bad.ok is False and "ABOVE" in bad.summary


def test_no_compiler_on_path_is_a_one_line_fail(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty), "CC": "", "CXX": ""}
    args = [
        "doctor",
        str(DEMO),
        *sum((["--set", s] for s in [*TINY, f"paths.run_dir={tmp_path / 'run'}", "training.compile=true"]), []),
        "--only",
        "toolchain,compiled_step",
    ]
    res = _cli(*args, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL toolchain: torch.compile cannot build kernels here; missing: a C++ compiler (g++ on PATH" in res.stdout
    assert "FAIL compiled_step: cannot compile here, missing: a C++ compiler" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_an_absurd_batch_fails_with_the_setting_that_fits(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "training.batch_size=10000000", "training.max_steps=2", "training.warmup_steps=1")
    (mem,) = run_doctor(spec, only=["memory"])
    assert mem.ok is False, mem.line()
    assert mem.summary.startswith("micro-batch 10000000 needs ~") and "the largest that fits is" in mem.summary
    assert "training.accumulate_grad_batches=" in mem.summary and "\n" not in mem.line()
    largest = mem.details["largest_micro_batch"]
    assert 0 < largest < 10_000_000


def test_missing_data_fails_and_bad_input_exits_2(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, "data.source=shard", f"data.shard={tmp_path / 'none.h5'}", f"data.latent_dir={tmp_path / 'none'}"
    )
    (res,) = run_doctor(spec, only=["data_residency"])
    assert res.ok is False and "cannot count the latents" in res.summary
    bad = _cli("doctor", str(DEMO), "--only", "memroy", "--set", f"paths.run_dir={tmp_path / 'r'}")
    assert bad.returncode == 2 and "--only: unknown check memroy" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r").exists()  # refused: nothing written


def test_validate_check_device_runs_the_doctor(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    sets = sum((["--set", s] for s in [*TINY, f"paths.run_dir={tmp_path / 'run'}", "training.compile=true"]), [])
    res = _cli("validate", str(DEMO), *sets, "--check-device", env={"PATH": str(empty), "CC": "", "CXX": ""})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "PASS jvp: " in res.stdout and "PASS memory: " in res.stdout
    assert "FAIL toolchain: " in res.stderr and "FAIL compiled_step: " in res.stderr and "Traceback" not in res.stderr
    report = json.loads((tmp_path / "run" / "doctor.json").read_text())
    assert report["ok"] is False and {c["name"] for c in report["checks"] if c["status"] == "FAIL"} == {
        "toolchain",
        "compiled_step",
    }
