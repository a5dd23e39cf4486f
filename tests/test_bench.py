"""`neuromf bench`: the CLI writes complete JSON, the variants see the same inputs, the meters separate runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from imf_tiny import tiny_net
from torch import nn

from neuromf.bench import BenchOptions, bench
from neuromf.bench.measure import count_flops, lookup_peak_tflops
from neuromf.bench.reference import naive_imf_loss
from neuromf.doctor.meter import MemoryMeter
from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.model.unet import set_gradient_checkpointing
from neuromf.spec import load_runspec
from neuromf.spec.schema import MeanFlowSpec, TimeSamplingSpec
from neuromf.train.compile import compile_loss

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runspecs" / "demo.yaml"
TINY_16 = ["model.spatial_size=[16,16,16]", "data.demo.size=16", "data.demo.n_volumes=8"]

VARIANT_FIELDS = {
    "name",
    "description",
    "compiled",
    "gradient_checkpointing",
    "channels_last",
    "error",
    "first_step_s",
    "first_step",
    "recompiles_during_timing",
    "skipped_steps",
    "peak_step_bytes",
    "peak_total_bytes",
    "mem_method",
    "step_s",
    "step_cpu_s",
    "data_wait_s",
    "data_wait_fraction",
    "latents_per_s",
    "flops_per_step",
    "flops_per_latent",
    "forward_equivalents_per_latent",
    "achieved_tflops",
    "mfu",
}
TOP_FIELDS = {
    "neuromf_bench",
    "date",
    "spec",
    "device",
    "versions",
    "settings",
    "peak_flops",
    "peak_source",
    "variants",
    "projection",
    "ratios",
    "ratios_best",
    "ratios_cpu",
    "targets",
}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "neuromf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_bench_steps_2_writes_json_with_all_fields(tmp_path: Path) -> None:
    sets = [a for s in [*TINY_16, f"paths.run_dir={tmp_path / 'run'}"] for a in ("--set", s)]
    out = tmp_path / "res" / "bench.json"
    res = _cli(
        "bench",
        str(DEMO),
        *sets,
        "--steps",
        "2",
        "--warmup",
        "0",
        "--batch",
        "4",
        "--variants",
        "naive,eager,fm",
        "--profile",
        "3",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "speedup_eager_vs_naive" in res.stdout and "1st grad norm" in res.stdout
    assert "eager: the ops with the most self time in one step" in res.stdout
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # written whole, no temporary left
    r = json.loads(out.read_text())
    assert TOP_FIELDS <= set(r), TOP_FIELDS - set(r)
    assert r["device"]["type"] == "cpu" and r["versions"]["torch"] == torch.__version__
    assert r["settings"]["batch_size"] == 4 and r["settings"]["latent_shape"] == [4, 16, 16, 16]
    assert r["settings"]["residency"] in ("host", "stream")
    assert list(r["variants"]) == ["naive", "eager", "fm"]
    for name, v in r["variants"].items():
        assert VARIANT_FIELDS <= set(v), (name, VARIANT_FIELDS - set(v))
        assert v["error"] is None, v["error"]
        assert len(v["step_s"]["all"]) == 2 and 0 < v["step_s"]["min"] <= v["step_s"]["median"] <= v["step_s"]["max"]
        assert len(v["step_cpu_s"]["all"]) == 2 and v["step_cpu_s"]["min"] > 0
        assert 0 <= v["data_wait_fraction"] < 0.5
        assert v["latents_per_s"] == pytest.approx(4 / v["step_s"]["median"])
        assert v["peak_step_bytes"] > 1e6 and v["peak_total_bytes"] > v["peak_step_bytes"]
        assert v["flops_per_step"] > 1e9 and v["mfu"] is None  # no peak table for a CPU
        assert v["recompiles_during_timing"] == 0
        prof = v["profile"]  # --profile 3: the three ops with the most self time, the largest first
        assert len(prof) == 3 and set(prof[0]) == {"name", "calls", "self_ms", "share"}
        assert (
            prof[0]["self_ms"] >= prof[1]["self_ms"] >= prof[2]["self_ms"] > 0
            and 0 < sum(k["share"] for k in prof) <= 1
        )
        assert any("convolution" in k["name"] for k in prof), prof  # a UNet step is mostly convolutions
    eager, naive, fm = (r["variants"][k] for k in ("eager", "naive", "fm"))
    # FLOPs: batch 4 has 1 r = t row; FM = 3 forward-equivalents x 4, iMF adds 3 (JVP) + 3 (pass 2) x 3 rows: 2.5x
    assert eager["flops_per_step"] / fm["flops_per_step"] == pytest.approx(2.5, rel=0.05)
    assert fm["forward_equivalents_per_latent"] == pytest.approx(3.0, rel=0.02)  # forward + backward (2 forwards)
    # the naive step JVPs every row inside a graph: more FLOPs and clearly more memory than ours
    assert naive["flops_per_step"] > eager["flops_per_step"]
    assert naive["peak_step_bytes"] > 1.4 * eager["peak_step_bytes"]
    # same network, batches, noise and times: the first steps' gradients agree
    assert eager["first_step"]["grad_norm"] == pytest.approx(naive["first_step"]["grad_norm"], rel=1e-4)
    assert set(r["ratios"]) == {
        "speedup_eager_vs_naive",
        "memory_eager_vs_naive",
        "cost_eager_vs_fm",
        "memory_eager_vs_fm",
    }
    assert set(r["ratios_cpu"]) == set(r["ratios_best"]) == {"speedup_eager_vs_naive", "cost_eager_vs_fm"}
    assert r["ratios"]["memory_eager_vs_naive"] == pytest.approx(eager["peak_step_bytes"] / naive["peak_step_bytes"])
    assert [t["name"] for t in r["targets"]] == ["our step <= 2.5x the flow-matching step (both eager)"]
    p = r["projection"]
    max_steps = load_runspec(DEMO, [f"paths.run_dir={tmp_path}"]).training.max_steps
    assert p["variant"] == "eager" and max_steps and p["total_steps"] == max_steps
    assert p["run_hours"] == pytest.approx(max_steps * p["seconds_per_step"] / 3600)


def test_cli_bench_bad_micro_batch_is_a_user_error(tmp_path: Path) -> None:
    res = _cli(
        "bench", str(DEMO), "--set", f"paths.run_dir={tmp_path}", "--batch", "8", "--micro-batch", "3", cwd=tmp_path
    )
    assert res.returncode == 2 and "--micro-batch: 3 must be >= 1 and divide --batch 8" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("bench", str(DEMO), "--set", f"paths.run_dir={tmp_path}", "--variants", "eager,fast", cwd=tmp_path)
    assert res.returncode == 2 and "--variants: unknown fast" in res.stderr
    res = _cli("bench", str(DEMO), "--set", f"paths.run_dir={tmp_path}", "--profile", "-1", cwd=tmp_path)
    assert res.returncode == 2 and "--profile: -1 must be >= 0" in res.stderr
    # An output that cannot be written is refused before any benchmarking, not after.
    (tmp_path / "a_file").write_text("x")
    res = _cli(
        "bench",
        str(DEMO),
        "--set",
        f"paths.run_dir={tmp_path}",
        "--json",
        str(tmp_path / "a_file" / "out.json"),
        cwd=tmp_path,
    )
    assert res.returncode == 2 and f"--json: cannot write {tmp_path / 'a_file' / 'out.json'}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "benchmarking" not in res.stdout


def _tiny_spec(tmp_path: Path, *extra: str) -> Any:
    return load_runspec(DEMO, [*TINY_16, f"paths.run_dir={tmp_path}", "training.batch_size=4", *extra])


def test_compare_runs_six_variants_and_the_fold_ab_is_asked_for_by_name(tmp_path: Path) -> None:
    from neuromf.bench import VARIANTS, default_variants

    spec = _tiny_spec(tmp_path)
    assert default_variants(spec, compare=True) == ["predecessor", "naive", "eager", "compiled", "fm", "fm_compiled"]
    assert default_variants(spec, compare=False) == ["eager"]  # the demo trains eagerly (training.compile: false)
    nofold = VARIANTS["compiled_nofold"]  # the fold's A/B: our compiled step, never folded
    assert (nofold.math, nofold.compiled, nofold.fold) == ("imf", True, False) and VARIANTS["compiled"].fold


def test_dual_biases_ab_runs_the_same_maths(tmp_path: Path) -> None:
    """eager vs eager_const_params: the JVP with and without dual biases, same first step, a speed ratio."""
    opts = BenchOptions(steps=1, warmup=0, variants=["eager", "eager_const_params"], data="synthetic", interleave=True)
    r = bench(_tiny_spec(tmp_path), opts)
    dual, const = r["variants"]["eager"], r["variants"]["eager_const_params"]
    assert dual["error"] is None and const["error"] is None
    assert dual["first_step"] == const["first_step"]  # bit-identical loss terms and gradient norm
    assert set(r["ratios"]) == {"speedup_dual_biases"}


def test_synthetic_data_micro_batches_and_checkpointing_run_the_same_maths(tmp_path: Path) -> None:
    """Through bench(): accumulation of 2 micro-batches and checkpointing change nothing in the first step."""
    opts = BenchOptions(steps=1, warmup=0, variants=["eager"], data="synthetic", epoch_latents=40)
    plain = bench(_tiny_spec(tmp_path), opts)["variants"]["eager"]
    ckpt = bench(_tiny_spec(tmp_path, "training.gradient_checkpointing=true"), opts)
    v = ckpt["variants"]["eager"]
    assert v["error"] is None and v["gradient_checkpointing"] is True
    assert v["first_step"]["grad_norm"] == pytest.approx(plain["first_step"]["grad_norm"], rel=1e-5)
    assert ckpt["settings"]["residency"].startswith("synthetic") and ckpt["projection"]["steps_per_epoch"] == 10
    assert v["flops_per_step"] == plain["flops_per_step"]  # model FLOPs: counted with checkpointing off
    acc = bench(_tiny_spec(tmp_path, "training.accumulate_grad_batches=2"), opts)
    assert acc["settings"]["micro_batch_size"] == 2 and acc["variants"]["eager"]["error"] is None


def test_interleaved_variants_see_the_same_inputs(tmp_path: Path) -> None:
    opts = BenchOptions(steps=2, warmup=0, variants=["naive", "eager"], data="synthetic", interleave=True)
    r = bench(_tiny_spec(tmp_path), opts)
    naive, eager = r["variants"]["naive"], r["variants"]["eager"]
    assert r["settings"]["interleave"] is True and naive["error"] is None and eager["error"] is None
    assert eager["first_step"]["grad_norm"] == pytest.approx(naive["first_step"]["grad_norm"], rel=1e-4)
    assert len(naive["step_s"]["all"]) == len(eager["step_s"]["all"]) == 2
    assert set(r["ratios"]) == {"speedup_eager_vs_naive", "memory_eager_vs_naive"}
    assert set(r["ratios_best"]) == set(r["ratios_cpu"]) == {"speedup_eager_vs_naive"}


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    assert den > 0
    return num / den


# Two levels (GroupNorm, ResBlocks, resblock up/down sampling, attention) keep a cold CPU compile to a few minutes.
TWO_LEVELS: dict[str, Any] = dict(
    channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 16], spatial_size=(8, 8, 8)
)


def _same_inputs(**net_overrides: Any) -> tuple[nn.Module, MeanFlowLoss, tuple[torch.Tensor, ...]]:
    net = tiny_net(**net_overrides)
    loss = MeanFlowLoss(MeanFlowSpec(), TimeSamplingSpec(), "x")
    g = torch.Generator().manual_seed(7)
    z0 = torch.randn((4, 4, *net_overrides.get("spatial_size", (16, 16, 16))), generator=g)
    return net, loss, (z0, *loss.draw(z0, g))


def _check_against_naive(compute: Any, checkpointing: bool = False, **net_overrides: Any) -> None:
    net, loss, (z0, e, t, r) = _same_inputs(**net_overrides)
    ref = naive_imf_loss(net, z0, e, t, r, loss.meanflow)
    ref["loss_total"].backward()
    g_ref = _grads(net)
    net.zero_grad(set_to_none=True)
    set_gradient_checkpointing(net, checkpointing)
    out = compute(loss, net, z0, e, t, r)
    out["loss_total"].backward()
    for k in ("loss_total", "loss_fm", "loss_mf", "mse_fm", "mse_mf"):
        assert torch.allclose(out[k], ref[k], rtol=1e-5, atol=1e-7), (k, out[k], ref[k])
    assert float(ref["mse_mf"]) != float(ref["mse_fm"])  # perturbed weights: the JVP term is not vacuous
    assert _rel(_grads(net), g_ref) < 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_optimised_step_equals_naive_reference_eager(checkpointing: bool) -> None:
    _check_against_naive(lambda loss, net, *x: loss.compute(net, *x), checkpointing)


@pytest.mark.slow
def test_optimised_step_equals_naive_reference_compiled_with_checkpointing(tmp_path: Path) -> None:
    """Compile on, with activation checkpointing (the big-batch GPU setting); compile without it:
    test_meanflow_loss.py::test_torch_compile_of_the_loss_step_matches_eager (eager = naive above)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    _check_against_naive(lambda loss, net, *x: compile_loss(loss.compute)(net, *x), True, **TWO_LEVELS)


def test_memory_meter_separates_one_measurement_from_the_next() -> None:
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    big = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
    del big
    first = meter.stop()
    meter.start()
    small = torch.ones(2**20 // 4)  # 1 MiB
    del small
    second = meter.stop()
    assert first["peak_step_bytes"] >= 30 * 2**20, first
    assert second["peak_step_bytes"] < 16 * 2**20, second  # the earlier 32 MiB peak does not leak into this one
    assert "clear_refs" in first["mem_method"]


def test_count_flops_of_a_convolution() -> None:
    conv = nn.Conv3d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 6, 6, 6)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 8 * 6**3 * 4 * 27  # 2 * batch * out * voxels * (in * kernel)


def test_peak_table() -> None:
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.5, "H100")
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == (756.5, "H100 PCIe")
    assert lookup_peak_tflops("NVIDIA H200", "bf16") == (989.5, "H200")
    assert lookup_peak_tflops("NVIDIA A100-SXM4-40GB", "tf32") == (156.0, "A100")
    assert lookup_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_no_product_module_imports_the_benchmark() -> None:
    """The benchmark adapts to the trainer, not the other way round: only neuromf/bench and the `bench` verb import it."""
    package = REPO / "neuromf"
    importers = [
        str(p.relative_to(REPO))
        for p in sorted(package.rglob("*.py"))
        if package / "bench" not in p.parents
        and p != package / "cli" / "bench.py"
        and re.search(r"^\s*(from|import) neuromf\.bench\b", p.read_text(), re.MULTILINE)
    ]
    assert importers == []
    assert re.search(
        r"^\s*from neuromf\.bench", (package / "cli" / "bench.py").read_text(), re.MULTILINE
    )  # the check sees imports
