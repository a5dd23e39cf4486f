"""Throughput of the configured step and the projected length of the run on this device."""

from __future__ import annotations

import statistics
import time
from typing import Any

from neuromf.doctor.context import DoctorContext
from neuromf.doctor.result import CheckResult

__all__ = ["TIMED_STEPS", "check_throughput", "steps_per_epoch"]

TIMED_STEPS = 3


def steps_per_epoch(ctx: DoctorContext) -> int | None:
    """Optimizer steps per epoch from the number of latents (None when the data cannot be counted here)."""
    from neuromf.cli.validate import count_latents
    from neuromf.data.split import estimate_sizes

    n = count_latents(ctx.spec)
    if n is None:
        return None
    n_train, _, _ = estimate_sizes(n, ctx.spec.data.val_fraction, ctx.spec.data.test_fraction)
    return max(1, n_train // ctx.spec.training.batch_size)


def check_throughput(ctx: DoctorContext) -> CheckResult:
    """Time a few micro-batch steps of the run's step (compiled when the compiled check passed)."""
    from neuromf.train.loop import Trainer

    tr = ctx.spec.training
    spec = ctx.spec.model_copy(update={"training": tr.model_copy(update={"accumulate_grad_batches": 1})})
    if "compiled" in ctx.shared:
        trainer, n = ctx.shared.pop("compiled")
        kind = f"compiled ({tr.compile_mode})"
    else:
        n = ctx.shared.get("largest_micro_batch", ctx.micro_batch)
        trainer, kind = Trainer.for_steps(spec, ctx.fresh_net(), ctx.device, ctx.dtype), "eager"
    batch = ctx.latents(n)
    times = []
    try:
        for i in range(TIMED_STEPS + 1):  # the first is a warm-up
            ctx.sync()
            start = time.perf_counter()
            trainer.train_step(batch)
            ctx.sync()
            if i:
                times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return CheckResult("throughput", False, f"the {kind} step failed: {type(e).__name__}: {first}")
    finally:
        del trainer, batch
        ctx.shared.pop("compiled", None)
        ctx.free()
    per_micro = statistics.median(times)
    per_gpu = ctx.micro_batch * ctx.micro_batches_per_step  # this GPU's share of one optimizer step
    per_step = per_micro * per_gpu / n
    details: dict[str, Any] = {
        "step": kind,
        "micro_batch": n,
        "timed_micro_steps": times,
        "seconds_per_step": per_step,
        "latents_per_s": per_gpu / per_step,
    }
    spe = steps_per_epoch(ctx)
    text = f"{kind} step: {per_step:.3g} s per optimizer step ({per_gpu / per_step:.1f} latents/s on this device)"
    if spe is None:
        return CheckResult("throughput", True, text + "; run length unknown (the data cannot be counted here)", details)
    total = ctx.spec.training.total_steps(spe)
    hours = total * per_step / 3600
    details.update(steps_per_epoch=spe, total_steps=total, projected_hours=hours)
    return CheckResult("throughput", True, f"{text}; {total} steps -> ~{hours:.1f} h of training steps", details)
