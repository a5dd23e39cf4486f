"""The iMF loss (docs/design.md, 'The method'; steps 1-10 of 'One training step'): x-prediction, exact no-grad JVP, adaptive weights.

Per batch z0 (B samples; the first n_fm = floor(B * data_proportion) have r = t):

    z_t = (1 - t) z0 + t e,   h = t - r,   v_c = e - z0
    u(z, t, h) = (z - net(z, t, h)) / max(t, floor)          (x-prediction; "u": u = net(z, t, h))
    v_tilde = u(z_t, t, 0)                                    gradient pass 1, whole batch
    du/dt = JVP of u at (z_t, t, h) along (sg[v_tilde], 1, 1)  no graph, r != t rows only
    V = u(z_t, t, h) + h * sg[du/dt]                          gradient pass 2, r != t rows only
    L_FM = adaptive(v_tilde - v_c),  L_MF = adaptive(V - v_c), loss_total = L_FM + lambda_mf L_MF

with floor = meanflow.denominator_floor (0.05). For the r = t rows h = 0, so V = v_tilde there:
those rows reuse pass 1 and never enter the JVP.
(1, 1) is the tangent of (t, h) when t moves with r fixed: dh/dt = 1.

Cost per r != t sample: JVP ~3 forwards (~2 compiled: neuromf/train/compile.py drops PyTorch's
conv(x, zero weight tangent) products), plus forward + backward of both passes; no activation
graph is kept for the JVP (its output is under stop-gradient), so peak memory is about that of
the two ordinary gradient passes. The JVP runs on the bare module `net` under the math SDPA
backend (fused attention has no forward-mode derivative); the gradient passes run on
`grad_net` (a DDP wrapper: torch.func.jvp through DDP would skip its gradient sync) and may
use fused attention. The network runs under autocast when `autocast_dtype` is given; u,
the loss, the weights and the reductions are fp32 (fp64 if z0 is fp64, for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from neuromf.meanflow.time_sampler import num_flow_matching, sample_time_pairs
from neuromf.model.unet import math_attention
from neuromf.spec.schema import MeanFlowSpec, TimeSamplingSpec

__all__ = ["MeanFlowLoss"]

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MeanFlowLoss:
    """The iMF loss as a callable object (EDM style): configure once, call per batch."""

    def __init__(
        self,
        meanflow: MeanFlowSpec,
        time_sampling: TimeSamplingSpec,
        prediction_type: Literal["x", "u"] = "x",
    ) -> None:
        if prediction_type not in ("x", "u"):
            raise ValueError(f"prediction_type must be 'x' or 'u', got {prediction_type!r}")
        self.meanflow = meanflow
        self.time_sampling = time_sampling
        self.prediction_type = prediction_type

    # -- randomness -------------------------------------------------------------------------
    def draw(self, z0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise e and times (t, r) for a batch, all from `generator` (drawn on its device)."""
        e = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        t, r = sample_time_pairs(z0.shape[0], self.time_sampling, generator, z0.device)
        return e.to(z0.device), t, r

    # -- the average velocity and its time derivative ----------------------------------------
    def u(
        self, net: Net, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, autocast_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """u(z, t, h) in z's dtype; only the network call is under autocast."""
        with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = net(z, t, h)
        out = out.to(z.dtype)
        if self.prediction_type == "u":
            return out
        denom = t.clamp(min=self.meanflow.denominator_floor).to(z.dtype)
        return (z - out) / denom.view(-1, *([1] * (z.dim() - 1)))

    def du_dt(
        self,
        net: Net,
        z: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor,
        v: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Exact d/dt u(z_t, t, r) with r fixed: the JVP along (v, 1, 1) in (z, t, h); builds no graph."""
        ones = torch.ones_like(t)
        # Eager only: the network's 1-D parameters (biases, norm scales) enter the JVP as primals with real zero
        # tangents. The numbers are the same, but where an op mixes a tangent-carrying tensor with a parameter that
        # has none, PyTorch builds a lazy zero tangent whose shape logic runs in Python (~1 ms per op on a CPU): the
        # demo network's JVP is ~18 % faster this way (docs/benchmarks.md). Conv and linear weights stay constants
        # (real zero tangents there would cost whole extra convolutions); a compiled loss traces through either.
        params = {}
        if isinstance(net, nn.Module) and not torch.compiler.is_compiling():
            params = {name: p for name, p in net.named_parameters() if p.dim() == 1}
        zero_tangents = {name: torch.zeros_like(p) for name, p in params.items()}

        def u_of(
            z_: torch.Tensor, t_: torch.Tensor, h_: torch.Tensor, params_: dict[str, torch.Tensor]
        ) -> torch.Tensor:
            if not params_:
                return self.u(net, z_, t_, h_, autocast_dtype)

            def net_with(*args: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(net, params_, args)

            return self.u(net_with, z_, t_, h_, autocast_dtype)

        with torch.no_grad(), math_attention():
            _, dudt = torch.func.jvp(u_of, (z, t, h, params), (v, ones, ones, zero_tangents))
        return dudt

    # -- the loss -----------------------------------------------------------------------------
    def adaptive(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean_b(sg[w] * l) with l = sum |delta|^p per sample, w = 1 / (l + eps)^norm_p; and the plain MSE."""
        mf = self.meanflow
        per_sample = delta.abs().pow(mf.loss_norm).flatten(1).sum(dim=1)
        weight = (per_sample.detach() + mf.norm_eps).pow(-mf.norm_p)
        return (weight * per_sample).mean(), delta.detach().square().mean()

    def compute(
        self,
        net: Net,
        z0: torch.Tensor,
        e: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        *,
        grad_net: Net | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss for given noise and times (no randomness here: the part to torch.compile)."""
        grad_net = net if grad_net is None else grad_net
        dtype = torch.promote_types(z0.dtype, torch.float32)
        z0, e, t, r = z0.to(dtype), e.to(dtype), t.to(dtype), r.to(dtype)
        batch = z0.shape[0]
        n_fm = num_flow_matching(batch, self.time_sampling.data_proportion)
        expand = (-1,) + (1,) * (z0.dim() - 1)
        z_t = (1 - t.view(expand)) * z0 + t.view(expand) * e
        h = t - r
        v_c = e - z0

        v_tilde = self.u(grad_net, z_t, t, torch.zeros_like(t), autocast_dtype)  # pass 1 (h = 0)
        if n_fm < batch:
            mf = slice(n_fm, batch)
            dudt = self.du_dt(net, z_t[mf], t[mf], h[mf], v_tilde[mf].detach(), autocast_dtype)
            u_mf = self.u(grad_net, z_t[mf], t[mf], h[mf], autocast_dtype)  # pass 2
            compound = torch.cat([v_tilde[:n_fm], u_mf + h[mf].view(expand) * dudt])
            dudt_rms = dudt.square().mean().sqrt()
        else:  # every row has r = t: V = v_tilde, nothing to differentiate
            compound = v_tilde
            dudt_rms = torch.zeros((), dtype=dtype, device=z0.device)

        loss_fm, mse_fm = self.adaptive(v_tilde - v_c)
        loss_mf, mse_mf = self.adaptive(compound - v_c)
        return {
            "loss_total": loss_fm + self.meanflow.lambda_mf * loss_mf,
            "loss_fm": loss_fm,
            "loss_mf": loss_mf,
            "mse_fm": mse_fm,
            "mse_mf": mse_mf,
            "dudt_rms": dudt_rms,
            "v_tilde_rms": v_tilde.detach().square().mean().sqrt(),
        }

    def __call__(
        self,
        net: nn.Module,
        z0: torch.Tensor,
        generator: torch.Generator,
        *,
        grad_net: Net | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draw (e, t, r) from `generator` and return the loss terms (loss_total is differentiable)."""
        e, t, r = self.draw(z0, generator)
        return self.compute(net, z0, e, t, r, grad_net=grad_net, autocast_dtype=autocast_dtype)
