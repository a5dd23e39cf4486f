"""The bench's `predecessor` variant: the predecessor's loss and gradients, and ratios against it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imf_tiny import tiny_net

from neuromf.bench import BenchOptions, bench
from neuromf.bench.predecessor import PredecessorOptions, predecessor_imf_loss
from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.model.unet import math_attention
from neuromf.spec import load_runspec
from neuromf.spec.schema import MeanFlowSpec, TimeSamplingSpec

DEMO = Path(__file__).resolve().parents[1] / "runspecs" / "demo.yaml"


def _predecessor_formula(model, x0, eps, t, r, p: float, norm_eps: float, t_min: float) -> torch.Tensor:
    """The predecessor's loss written the way it wrote it: model(z, r, t), tangent (v, dt=1, dr=0) in (z, t, r)."""

    def u_fn(z, t_, r_):
        return (z - model(z, r_, t_)) / t_.clamp(min=t_min).view(-1, 1, 1, 1, 1)

    tb = t.view(-1, 1, 1, 1, 1)
    z_t = (1 - tb) * x0 + tb * eps
    with torch.no_grad():
        v_tilde = u_fn(z_t, t, t)
    with (
        math_attention()
    ):  # fused attention has no forward-mode rule (the predecessor's network had none at these levels)
        u, du_dt = torch.func.jvp(u_fn, (z_t, t, r), (v_tilde, torch.ones_like(t), torch.zeros_like(r)))
    V = u + (t - r).clamp(min=0.0).view(-1, 1, 1, 1, 1) * du_dt.detach()
    raw = ((V - (eps - x0)).abs() ** p).sum(dim=(1, 2, 3, 4))
    return (raw / (raw.detach() + norm_eps)).mean()


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters() if p.grad is not None]


# Two levels (attention at the second): the formula's every part, in seconds on a CPU.
TWO_LEVELS = dict(channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 16], spatial_size=(8, 8, 8))
TWO_LEVELS_SET = [
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=[0,16]",
    "model.spatial_size=[8,8,8]",
    "data.demo.size=8",
    "data.demo.n_volumes=8",
]


def test_predecessor_loss_and_gradients_equal_its_formula() -> None:
    net = tiny_net(dtype=torch.float64, **TWO_LEVELS)
    mf = MeanFlowSpec(norm_eps=1.0)
    loss = MeanFlowLoss(mf, TimeSamplingSpec(data_proportion=0.5), "x")
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn((4, 4, 8, 8, 8), generator=g, dtype=torch.float64)
    e, t, r = loss.draw(z0, g)
    e, t, r = e.double(), t.double(), r.double()
    assert bool((t[:2] == r[:2]).all()) and bool((t[2:] > r[2:]).all())  # both kinds of rows are in the batch

    ref = _predecessor_formula(
        lambda z, r_, t_: net(z, t_, t_ - r_), z0, e, t, r, mf.loss_norm, 1.0, mf.denominator_floor
    )
    ref.backward()
    g_ref = _grads(net)
    net.zero_grad(set_to_none=True)
    out = predecessor_imf_loss(net, z0, e, t, r, mf, "x", norm_eps=1.0)
    out["loss_total"].backward()
    got = _grads(net)

    assert torch.allclose(out["loss_total"], ref, rtol=1e-10, atol=0)
    assert len(got) == len(g_ref) > 0
    for a, b in zip(got, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    # the norm_eps option is used: another value gives another loss
    other = predecessor_imf_loss(net, z0, e, t, r, mf, "x", norm_eps=1e4)["loss_total"]  # l ~ 2e3 per sample
    assert abs(float(other) - float(ref)) > 0.1 * abs(float(ref))


@pytest.mark.slow
def test_bench_reports_ratios_against_the_predecessor(tmp_path: Path) -> None:
    spec = load_runspec(DEMO, [*TWO_LEVELS_SET, f"paths.run_dir={tmp_path}", "training.batch_size=4"])
    opts = BenchOptions(
        steps=1,
        warmup=0,
        variants=["predecessor", "naive", "eager"],
        data="synthetic",
        interleave=True,
        predecessor=PredecessorOptions(norm_eps=1.0, data_proportion=0.5),
    )
    out = bench(spec, opts)
    pred = out["variants"]["predecessor"]
    assert pred["error"] is None and pred["gradient_checkpointing"] is False
    assert set(pred["first_step"]) >= {"loss_total", "loss_mf", "grad_norm"} and "loss_fm" not in pred["first_step"]
    against_both = {
        "speedup_eager_vs_predecessor",
        "memory_eager_vs_predecessor",
        "cost_naive_vs_predecessor",
        "speedup_eager_vs_naive",
        "memory_eager_vs_naive",
    }
    assert set(out["ratios"]) == against_both and all(v > 0 for v in out["ratios"].values())
    assert out["settings"]["predecessor"] == {"norm_eps": 1.0, "data_proportion": 0.5}
    # the predecessor builds no graph for v_tilde and has no L_FM term: fewer FLOPs than the naive step
    assert pred["flops_per_step"] < out["variants"]["naive"]["flops_per_step"]


@pytest.mark.parametrize("proportion", [None, 0.5])
def test_predecessor_draws_its_own_r_equals_t_fraction(tmp_path: Path, proportion) -> None:
    from neuromf.bench.run import BenchSetup

    spec = load_runspec(DEMO, [f"paths.run_dir={tmp_path}", "training.batch_size=8"])  # data_proportion 0.25
    b = BenchSetup(spec, BenchOptions(data="synthetic", predecessor=PredecessorOptions(data_proportion=proportion)))
    z0 = torch.zeros((8, 4, 16, 16, 16))
    _, t, r = b.draw_loss["predecessor"].draw(z0, torch.Generator().manual_seed(0))
    assert int((t == r).sum()) == (2 if proportion is None else 4)
