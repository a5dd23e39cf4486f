"""The predecessor's training step, as a bench baseline (nothing here trains a NeuroMF model).

What the predecessor (MarioPasc/neuromf: its MeanFlow pipeline with the exact JVP strategy, single head)
does per batch, in NeuroMF's notation (the network takes (z, t, h) with h = t - r; the predecessor's
took (z, r, t), so its tangent (v, dt = 1, dr = 0) is (v, 1, 1) in (z, t, h)):

    v_tilde = u(z_t, t, h = 0)                  under no_grad: no graph, no gradient through it
    (u, du/dt) = jvp(u, (z_t, t, h), (v_tilde, 1, 1))   WHOLE batch (r = t rows too), graph-building
    V = u + max(h, 0) * sg[du/dt]
    l_i = sum |V_i - v_c,i|^p,   loss = mean_i l_i / (sg[l_i] + norm_eps)^norm_p     (L_MF only)

Backward runs through the JVP's graph (its primal u); there is no separate flow-matching term (for
the r = t rows V = u, which is what supervises the instantaneous velocity). Its run configuration
used norm_eps 1.0 and data_proportion 0.5 (half the batch with r = t): `PredecessorOptions`.

The difference from `naive` (neuromf/bench/reference.py): naive builds v_tilde with a graph and
adds NeuroMF's L_FM term, one more forward and backward than the predecessor ever ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuromf.bench.reference import u_function
from neuromf.model.unet import math_attention
from neuromf.spec.schema import MeanFlowSpec

__all__ = ["PredecessorOptions", "predecessor_imf_loss"]

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PredecessorOptions:
    """The predecessor's loss settings that differ from a NeuroMF run-spec (bench options)."""

    norm_eps: float = 1.0
    # Fraction of the batch with r = t. None: the run-spec's time_sampling.data_proportion, so that every
    # variant of one bench sees the same (t, r); the predecessor's step costs the same for any value.
    data_proportion: float | None = 0.5


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1)))


def predecessor_imf_loss(
    net: Net,
    z0: torch.Tensor,
    e: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mf: MeanFlowSpec,
    prediction_type: str = "x",
    *,
    norm_eps: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The predecessor's loss on given noise and times (same arguments as `MeanFlowLoss.compute`)."""
    dtype = torch.promote_types(z0.dtype, torch.float32)
    z0, e, t, r = z0.to(dtype), e.to(dtype), t.to(dtype), r.to(dtype)
    z_t = (1 - _bcast(t, z0)) * z0 + _bcast(t, z0) * e
    v_c = e - z0
    h = t - r

    u_of = u_function(net, mf, prediction_type, autocast_dtype)  # the network as u(z, t, h), x -> u included

    with torch.no_grad():
        v_tilde = u_of(z_t, t, torch.zeros_like(t))
    with math_attention():  # forward-mode AD has no fused-attention rule
        u, dudt = torch.func.jvp(u_of, (z_t, t, h), (v_tilde, torch.ones_like(t), torch.ones_like(t)))
    compound = u + _bcast(h.clamp(min=0.0), z0) * dudt.detach()
    per_sample = (compound - v_c).abs().pow(mf.loss_norm).flatten(1).sum(dim=1)
    loss = (per_sample / (per_sample.detach() + norm_eps).pow(mf.norm_p)).mean()
    return {
        "loss_total": loss,
        "loss_mf": loss,
        "mse_mf": (compound - v_c).detach().square().mean(),
        "v_tilde_rms": v_tilde.square().mean().sqrt(),
    }
