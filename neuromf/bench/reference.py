"""Deliberately naive losses, for benchmarks and tests: the iMF loss as the predecessor (the earlier research code, docs/design.md, 'Where the names come from') computed it, and the FM floor.

`naive_imf_loss` is the textbook form of docs/design.md, 'The exact JVP': one graph-building
`torch.func.jvp` over the WHOLE batch (r = t rows included), with the primal
output u reused for the gradient. Backward then runs through the JVP's graph:
about 5x the activation memory of an ordinary forward/backward, which is why the
predecessor fitted only batch 2 per A100 40GB. It is the reference that
`MeanFlowLoss.compute` (no-grad JVP on the r != t rows, two gradient passes)
must equal, and the baseline `neuromf bench --compare` measures against.

`flow_matching_loss` is the plain flow-matching step of the same network: one
forward (h = 0) and its backward, the adaptive loss on v_tilde - v_c. An iMF
step cannot cost less than this; by FLOPs it costs about 2.5x as much
(3 forward-equivalents per sample for FM; for iMF, another 3 per JVP and 3 per
second pass on the r != t rows, which are 3/4 of them).

Both take (net, z0, e, t, r, mf, prediction_type, autocast_dtype=); `as_compute`
gives them the call of `MeanFlowLoss.compute`, so that `Trainer.train_step` runs
them in place of the real loss (`neuromf bench`, tests/_ddp_step.py). Nothing here
is used to train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from neuromf.model.unet import math_attention
from neuromf.spec.schema import MeanFlowSpec

__all__ = ["as_compute", "flow_matching_loss", "naive_imf_loss"]

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _col(s: torch.Tensor) -> torch.Tensor:
    return s.view(-1, 1, 1, 1, 1)


def u_function(net: Net, mf: MeanFlowSpec, prediction_type: str, autocast_dtype: torch.dtype | None) -> Net:
    """u(z, t, h): the network under autocast (if asked), the x -> u conversion in z's dtype."""

    def u_fn(z: torch.Tensor, tt: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = net(z, tt, hh)
        out = out.to(z.dtype)
        return out if prediction_type == "u" else (z - out) / _col(tt.clamp(min=mf.denominator_floor))

    return u_fn


def _weighted(delta: torch.Tensor, mf: MeanFlowSpec) -> torch.Tensor:
    per_sample = (delta.abs() ** mf.loss_norm).sum(dim=(1, 2, 3, 4))
    return (per_sample / (per_sample.detach() + mf.norm_eps) ** mf.norm_p).mean()


def naive_imf_loss(
    net: Net,
    z0: torch.Tensor,
    e: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mf: MeanFlowSpec,
    prediction_type: str = "x",
    *,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Deliberately naive iMF loss: whole batch, graph-building torch.func.jvp, no slicing, no reuse."""
    t, r = t.to(z0.dtype), r.to(z0.dtype)
    z_t = (1 - _col(t)) * z0 + _col(t) * e
    h = t - r
    u_fn = u_function(net, mf, prediction_type, autocast_dtype)
    with math_attention():  # everything under the math backend, as a forward-AD-safe step must be
        v_tilde = u_fn(z_t, t, torch.zeros_like(t))
        u, dudt = torch.func.jvp(u_fn, (z_t, t, h), (v_tilde.detach(), torch.ones_like(t), torch.ones_like(t)))
    compound = u + _col(h) * dudt.detach()
    loss_fm, loss_mf = _weighted(v_tilde - (e - z0), mf), _weighted(compound - (e - z0), mf)
    return {
        "loss_total": loss_fm + mf.lambda_mf * loss_mf,
        "loss_fm": loss_fm,
        "loss_mf": loss_mf,
        "mse_fm": ((v_tilde - (e - z0)) ** 2).mean(),
        "mse_mf": ((compound - (e - z0)) ** 2).mean(),
    }


def flow_matching_loss(
    net: Net,
    z0: torch.Tensor,
    e: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mf: MeanFlowSpec,
    prediction_type: str = "x",
    *,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Plain flow matching with the same network, inputs and weighting: the cost floor of a step (r is unused)."""
    del r
    dtype = torch.promote_types(z0.dtype, torch.float32)
    z0, e, t = z0.to(dtype), e.to(dtype), t.to(dtype)
    z_t = (1 - _col(t)) * z0 + _col(t) * e
    v_tilde = u_function(net, mf, prediction_type, autocast_dtype)(z_t, t, torch.zeros_like(t))
    delta = v_tilde - (e - z0)
    loss_fm = _weighted(delta, mf)
    return {"loss_total": loss_fm, "loss_fm": loss_fm, "mse_fm": delta.detach().square().mean()}


def as_compute(loss_fn: Callable[..., dict[str, torch.Tensor]], **bound: Any) -> Callable[..., dict[str, torch.Tensor]]:
    """`loss_fn` (with `bound` arguments, e.g. mf and prediction_type) called as `MeanFlowLoss.compute` is:
    (net, z0, e, t, r, grad_net=, autocast_dtype=). A reference has one network for everything: `grad_net`
    when given (the DDP wrapper of a multi-process run, in both roles), else `net`."""

    def compute(
        net: Net,
        z0: torch.Tensor,
        e: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        *,
        grad_net: Net | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        return loss_fn(net if grad_net is None else grad_net, z0, e, t, r, autocast_dtype=autocast_dtype, **bound)

    return compute
