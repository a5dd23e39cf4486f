"""training.compile_mode and the bench's GPU levers: chosen in the run-spec or on the command line, refused when wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuromf.spec import load_runspec
from neuromf.train.compile import COMPILE_MODES, compile_loss, uses_cuda_graphs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runspecs" / "demo.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuromf", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_compile_mode_in_the_run_spec() -> None:
    assert load_runspec(DEMO).training.compile_mode == "default"
    assert load_runspec(DEMO, ["training.compile_mode=reduce-overhead"]).training.compile_mode == "reduce-overhead"
    res = _cli("validate", str(DEMO), "--set", "training.compile_mode=fast")
    assert res.returncode == 2 and "training.compile_mode" in res.stderr and "Traceback" not in res.stderr
    assert [m for m in COMPILE_MODES if uses_cuda_graphs(m)] == ["reduce-overhead", "max-autotune"]
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_loss(lambda x: x, mode="fast")


def test_bench_levers_are_checked_before_any_work(tmp_path: Path) -> None:
    run_dir = ["--set", f"paths.run_dir={tmp_path}"]
    res = _cli("bench", str(DEMO), *run_dir, "--predecessor-data-proportion", "1.5")
    assert res.returncode == 2 and "--predecessor-data-proportion: '1.5' must be in [0, 1]" in res.stderr
    res = _cli("bench", str(DEMO), *run_dir, "--compile-mode", "fast")
    assert res.returncode == 2 and "--compile-mode" in res.stderr and "benchmarking" not in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_each_mode_compiles_to_the_same_values(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU CUDA graphs do not apply (Inductor skips them for CPU tensors): same values, same gradients."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()

    def fn(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_total": (torch.tanh(x @ w) ** 2).mean()}

    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    eager = fn(w, x)["loss_total"]
    (g_eager,) = torch.autograd.grad(eager, w)
    compiled = compile_loss(fn, mode=mode)
    for _ in range(2):  # the second call replays (a CUDA graph on a GPU)
        got = compiled(w, x)["loss_total"]
        (g,) = torch.autograd.grad(got, w)
        assert torch.allclose(got, eager, rtol=1e-5) and torch.allclose(g, g_eager, rtol=1e-4, atol=1e-7)
