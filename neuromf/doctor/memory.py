"""Memory of one training step at the configured micro-batch; if it does not fit, what does.

The step is the trainer's own (`Trainer.train_step`: the loss, backward, clipping, AdamW, EMA) on a fresh
copy of the network, eager. Its peak above the memory in use before it (weights, optimizer state, EMA) grows with the
micro-batch: measured at m = min(micro-batch, 2) latents, m's peak / m per latent is a slight
overestimate (it also carries the gradients, a fixed cost), so the projection errs on the safe side.
When the projection fits, the configured micro-batch runs for real and its measured peak is reported
(on a GPU: an out-of-memory error is a FAIL). When it does not fit, the largest micro-batch that does
is reported, with the accumulate_grad_batches and gradient_checkpointing settings that make the
configured batch fit.
"""

from __future__ import annotations

from typing import Any

import torch

from neuromf.doctor.context import DoctorContext
from neuromf.doctor.result import CheckResult

__all__ = ["HEADROOM", "capacity_bytes", "check_memory", "step_peak"]

HEADROOM = 0.9  # plan with 90 % of the memory: allocator fragmentation, the CUDA context, the data


def capacity_bytes(device: torch.device) -> int:
    """What this process can use: on a GPU, free memory plus what our allocator holds; on a CPU, RAM available plus our RSS."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device))
    from neuromf.data.prepare import available_host_memory
    from neuromf.doctor.meter import status_bytes

    return available_host_memory() + status_bytes("VmRSS:")


def step_peak(ctx: DoctorContext, n: int, checkpointing: bool) -> dict[str, int]:
    """{"before": bytes in use before the step, "peak": the step's own peak} of one eager step of `n` latents."""
    from neuromf.doctor.meter import MemoryMeter
    from neuromf.model.unet import set_gradient_checkpointing
    from neuromf.train.loop import Trainer

    spec = ctx.spec.model_copy(update={"training": ctx.spec.training.model_copy(update={"accumulate_grad_batches": 1})})
    net = ctx.fresh_net()
    set_gradient_checkpointing(net, checkpointing)
    trainer = Trainer.for_steps(spec, net, ctx.device, ctx.dtype)
    batch = ctx.latents(n)
    try:
        trainer.train_step(batch)  # optimizer state now exists
        meter = MemoryMeter(ctx.device)
        meter.start()
        before = meter.in_use_at_start
        trainer.train_step(batch)
        peak = meter.stop()["peak_step_bytes"]
    finally:
        del net, trainer, batch
        ctx.free()
    return {"before": int(before), "peak": int(peak or 0)}


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, int(n**0.5) + 1) if n % k == 0]
    return sorted({*small, *(n // k for k in small)})


def check_memory(ctx: DoctorContext) -> CheckResult:
    micro, tr = ctx.micro_batch, ctx.spec.training
    capacity = capacity_bytes(ctx.device)
    room = HEADROOM * capacity
    m = min(micro, 2)
    probe = step_peak(ctx, m, tr.gradient_checkpointing)
    per_latent = probe["peak"] / m
    fixed = probe["before"]
    needed = fixed + per_latent * micro
    details: dict[str, Any] = {
        "micro_batch": micro,
        "capacity_bytes": capacity,
        "headroom": HEADROOM,
        "probe_latents": m,
        "resident_bytes": fixed,
        "per_latent_bytes": per_latent,
        "projected_bytes": needed,
        "gradient_checkpointing": tr.gradient_checkpointing,
    }
    largest = max(0, int((room - fixed) // per_latent)) if per_latent > 0 else micro
    ctx.shared["largest_micro_batch"] = min(micro, max(1, largest))
    if needed <= room:
        if micro > m:
            try:
                measured = step_peak(ctx, micro, tr.gradient_checkpointing)
            except torch.OutOfMemoryError:
                ctx.free()
                ctx.shared["largest_micro_batch"] = m
                return CheckResult(
                    "memory",
                    False,
                    f"micro-batch {micro}: out of memory although ~{_gib(needed)} was projected "
                    f"of {_gib(capacity)}; lower the micro-batch (training.accumulate_grad_batches)",
                    details,
                )
            details["measured_bytes"] = measured["before"] + measured["peak"]
            needed = details["measured_bytes"]
        return CheckResult(
            "memory",
            True,
            f"micro-batch {micro}: {'peak' if 'measured_bytes' in details else '~'} {_gib(needed)} of {_gib(capacity)}",
            details,
        )
    # Does not fit: the largest micro-batch that does, and the settings that make the configured batch fit.
    fixes = []
    per_gpu = micro * tr.accumulate_grad_batches
    fitting = [k for k in _divisors(per_gpu) if per_gpu // k <= largest]
    if fitting:
        k = fitting[0]
        fixes.append(f"training.accumulate_grad_batches={k} (micro-batch {per_gpu // k})")
    if not tr.gradient_checkpointing:
        ckpt = step_peak(ctx, m, True)
        per_latent_ckpt = ckpt["peak"] / m
        details["per_latent_bytes_checkpointing"] = per_latent_ckpt
        largest_ckpt = max(0, int((room - ckpt["before"]) // per_latent_ckpt)) if per_latent_ckpt > 0 else 0
        ok_ckpt = [k for k in _divisors(per_gpu) if per_gpu // k <= largest_ckpt]
        if ok_ckpt:
            k = ok_ckpt[0]
            fixes.append(
                "training.gradient_checkpointing=true"
                + (f" with training.accumulate_grad_batches={k}" if k > 1 else "")
            )
    details["largest_micro_batch"] = largest
    details["fixes"] = fixes
    fix = "; or ".join(fixes) if fixes else "no micro-batch fits: a smaller model or a larger device"
    return CheckResult(
        "memory",
        False,
        f"micro-batch {micro} needs ~{_gib(needed)}, {_gib(capacity)} available: the largest "
        f"that fits is {largest}; set {fix}",
        details,
    )
