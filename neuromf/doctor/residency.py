"""Where the latents will live during training (data.residency) and how much memory that takes."""

from __future__ import annotations

import math

import torch

from neuromf.doctor.context import DoctorContext
from neuromf.doctor.result import CheckResult

__all__ = ["check_residency"]


def check_residency(ctx: DoctorContext) -> CheckResult:
    from neuromf.cli.validate import count_latents
    from neuromf.data.prepare import available_host_memory, choose_residency

    spec = ctx.spec
    n = count_latents(spec)
    if n is None:
        where = spec.data.shard if spec.data.source == "shard" else spec.data.latent_dir
        return CheckResult(
            "data_residency", False, f"data: cannot count the latents ({spec.data.source} at {where} not found)"
        )
    nbytes = n * spec.model.in_channels * math.prod(spec.model.spatial_size) * 4  # float32 in memory
    chosen = choose_residency(spec.data.residency, nbytes, ctx.device)
    room = {
        "device": torch.cuda.mem_get_info(ctx.device)[0] if ctx.device.type == "cuda" else available_host_memory(),
        "host": available_host_memory(),
    }.get(chosen)
    details = {"latents": n, "bytes": nbytes, "requested": spec.data.residency, "chosen": chosen, "room_bytes": room}
    place = {
        "device": "on the GPU" if ctx.device.type == "cuda" else "in RAM",
        "host": "in RAM",
        "stream": "read from the shard as it goes",
    }[chosen]
    text = f"{chosen} ({spec.data.residency} requested): {n} latents, {nbytes / 2**30:.2f} GiB {place}"
    if room is not None and nbytes > room:
        return CheckResult(
            "data_residency",
            False,
            f"{text}, but only {room / 2**30:.2f} GiB free there; set data.residency to auto or stream",
            details,
        )
    return CheckResult("data_residency", True, text, details)
