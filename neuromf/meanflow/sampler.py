"""One-step and few-step MeanFlow sampling (t = 1 is noise, t = 0 is data).

One step with x-prediction is ONE network call, z0_hat = net(e, t = 1, h = 1): the network
output is the sample (no u -> x conversion; with u-prediction, z0 = e - u). Several steps walk
a uniform grid 1 = t_0 > t_1 > ... > t_n = 0 with z_r = z_t - (t - r) u(z_t, t, h = t - r).
The samplers run under no_grad, leave the module's train/eval mode alone, work with online or
EMA weights alike and are deterministic given the noise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["sample", "sample_multi_step", "sample_one_step"]

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _call(net: Net, z: torch.Tensor, t: float, h: float, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """net(z, t, h) for scalar t, h broadcast to the batch; output in z's dtype."""
    tt = torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device)
    hh = torch.full((z.shape[0],), h, dtype=z.dtype, device=z.device)
    with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = net(z, tt, hh)
    return out.to(z.dtype)


@torch.no_grad()
def sample_one_step(
    net: Net, noise: torch.Tensor, prediction_type: str = "x", autocast_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """1-NFE sample: exactly one call net(noise, t = 1, h = 1)."""
    noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
    out = _call(net, noise, 1.0, 1.0, autocast_dtype)
    if prediction_type == "x":
        return out
    if prediction_type == "u":
        return noise - out  # z_0 = z_1 - (1 - 0) u(z_1, 1, 1)
    raise ValueError(f"prediction_type must be 'x' or 'u', got {prediction_type!r}")


@torch.no_grad()
def sample_multi_step(
    net: Net,
    noise: torch.Tensor,
    nfe: int,
    prediction_type: str = "x",
    t_min: float = 0.05,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """`nfe` steps over the uniform grid 1 -> 0; u = (z - x_hat) / max(t, t_min) for x-prediction."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if prediction_type not in ("x", "u"):
        raise ValueError(f"prediction_type must be 'x' or 'u', got {prediction_type!r}")
    z = noise.to(torch.promote_types(noise.dtype, torch.float32))
    grid = [1.0 - k / nfe for k in range(nfe)] + [0.0]
    for t, r in zip(grid[:-1], grid[1:]):
        out = _call(net, z, t, t - r, autocast_dtype)
        u = out if prediction_type == "u" else (z - out) / max(t, t_min)
        z = z - (t - r) * u
    return z


@torch.no_grad()
def sample(
    net: Net,
    noise: torch.Tensor,
    nfe: int,
    prediction_type: str = "x",
    t_min: float = 0.05,
    autocast_dtype: Optional[torch.dtype] = None,
    batch_size: Optional[int] = None,
) -> torch.Tensor:
    """Samples from `noise` (n, C, D, H, W) in `nfe` steps, `batch_size` at a time; float32, on noise's device.

    The one entry point that training (periodic samples), `neuromf sample` and `neuromf evaluate`
    use: `t_min` must be the run's `meanflow.t_min` (the floor of the u denominator it trained with).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    for e in noise.split(batch_size or max(1, noise.shape[0])):
        if nfe == 1:
            chunks.append(sample_one_step(net, e, prediction_type, autocast_dtype))
        else:
            chunks.append(sample_multi_step(net, e, nfe, prediction_type, t_min, autocast_dtype))
    return torch.cat(chunks).float()
