"""One optimizer step and the validation losses: micro-batches, DDP gradient sync, noise tied to the step.

The noise and times (e, t, r) of micro-batch chunk c of optimizer step s come
from a generator seeded by (training.seed, s, c); with several processes rank r
holds chunks r * accumulate .. r * accumulate + accumulate - 1 of the global
batch. So the randomness does not depend on how the global batch is spread
over processes and micro-batches, and a resumed run draws what an
uninterrupted one drew.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Optional, Union

import torch

from neuromf.seeding import derived_generator
from neuromf.spec.schema import RunSpec
from neuromf.train.distributed import Dist

__all__ = ["ComputeFn", "NoiseSource", "VAL_KEYS", "chunk_generator", "train_step", "validation_losses"]

# loss.compute(net, z0, e, t, r, grad_net=..., autocast_dtype=...): the pure part of the loss, eager or compiled
ComputeFn = Callable[..., dict[str, torch.Tensor]]
# Where a step's (e, t, r) come from: one generator drawn in turn, or micro-batch index -> its own generator.
NoiseSource = Union[torch.Generator, Callable[[int], torch.Generator]]
VAL_KEYS = ("loss_total", "loss_fm", "loss_mf", "mse_fm", "mse_mf")


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The (e, t, r) generator of chunk `chunk` (rank * accumulate + micro) of optimizer step `step`."""
    return derived_generator(device, "loss", seed, step, chunk)


def train_step(
    loss: Any,
    compute: ComputeFn,
    net: torch.nn.Module,
    batch: torch.Tensor,
    noise: NoiseSource,
    optimizer: torch.optim.Optimizer,
    spec: RunSpec,
    dtype: Optional[torch.dtype],
    *,
    grad_net: Optional[torch.nn.Module] = None,
    dist: Optional[Dist] = None,
) -> tuple[bool, dict[str, torch.Tensor]]:
    """Micro-batches -> gradients -> (if all finite) clip and step. Returns (applied, metrics).

    `net` is the bare module (the no-grad JVP runs on it); `grad_net` the module the gradient passes run
    through: the DDP wrapper in a multi-process run, which all-reduces the gradients after the LAST
    micro-batch (no_sync on the others). Clipping and the NaN/Inf check then see the synchronised
    gradients, and the metrics are averaged over the ranks (`dist`), so every rank takes the same decision.
    """
    accumulate = spec.training.accumulate_grad_batches
    grad_net = net if grad_net is None else grad_net
    through = {} if grad_net is net else {"grad_net": grad_net}  # benchmarks' reference losses take no grad_net
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    micros = batch.chunk(accumulate)
    for i, micro in enumerate(micros):
        generator = noise if isinstance(noise, torch.Generator) else noise(i)
        e, t, r = loss.draw(micro, generator)  # randomness outside the compiled part
        defer_sync = i < len(micros) - 1 and hasattr(grad_net, "no_sync")
        with grad_net.no_sync() if defer_sync else nullcontext():  # type: ignore[operator]
            out = compute(net, micro, e, t, r, autocast_dtype=dtype, **through)
            (out["loss_total"] / accumulate).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / accumulate
    params = [p for p in net.parameters() if p.grad is not None]
    clip = spec.training.grad_clip if spec.training.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # the norm before clipping
    if dist is not None and dist.enabled:
        # One all-reduce: the mean of each metric and how many ranks saw a non-finite gradient norm.
        keys = list(sums)
        packed = torch.stack([sums[k] for k in keys] + [(~torch.isfinite(grad_norm)).float()]).double()
        dist.all_reduce(packed, "sum", "the step's metrics all-reduce")
        sums = {k: (packed[i] / dist.world_size).float() for i, k in enumerate(keys)}
        grad_ok = bool(packed[-1] == 0)
    else:
        grad_ok = True
    sums["grad_norm"] = grad_norm
    finite = grad_ok and bool(torch.isfinite(sums["loss_total"]) & torch.isfinite(grad_norm))  # one sync per step
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return finite, sums


@torch.no_grad()
def validation_losses(
    loss: Any, net: torch.nn.Module, batches: Any, spec: RunSpec, device: torch.device, dtype: Optional[torch.dtype],
    dist: Optional[Dist] = None,
) -> dict[str, float]:
    """Mean loss terms over the val split (VAL_KEYS and mse_total).

    Batch j's noise comes from (seed, j), so numbers of different epochs compare; with `dist`, rank r
    takes batches j = r, r + world_size, ... and the sums are all-reduced, so the numbers do not depend
    on how many processes share the work (only on the batch size).
    """
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    sums = torch.zeros(len(VAL_KEYS) + 1, dtype=torch.float64, device=device)  # the terms, then the count
    for j, batch in batches.numbered(rank, world):
        out = loss(net, batch, derived_generator(device, "val", spec.training.seed, j), autocast_dtype=dtype)
        size = batch.shape[0]
        sums[:-1] += torch.stack([out[k].double() for k in VAL_KEYS]) * size
        sums[-1] += size
    if dist is not None:
        dist.all_reduce(sums, "sum", "the validation all-reduce")
    values = sums.tolist()
    n = max(values[-1], 1.0)
    means = {k: v / n for k, v in zip(VAL_KEYS, values)}
    means["mse_total"] = means["mse_fm"] + spec.meanflow.lambda_mf * means["mse_mf"]
    return means
