"""One compiled step of the run's loss: the compiler works here and the step does not fall back to eager.

The trainer falls back to eager when compilation fails (slower, same maths); before a long run one wants
to know that it will not. Missing pieces (a C/C++ compiler, Python headers, libcuda: neuromf/doctor/
environment.py) are named up front instead of after a compile attempt.
"""

from __future__ import annotations

import time
from typing import Any

from neuromf.doctor.context import DoctorContext
from neuromf.doctor.environment import missing_toolchain
from neuromf.doctor.result import CheckResult

__all__ = ["check_compiled_step"]


def _counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())


def check_compiled_step(ctx: DoctorContext) -> CheckResult:
    """Compile the loss as the trainer does (training.compile_mode, fold_zero_tangents) and run one step."""
    from neuromf.train.compile import compile_loss
    from neuromf.train.loop import Trainer

    tr = ctx.spec.training
    if not tr.compile:
        return CheckResult("compiled_step", None, "training.compile is off (the run is eager)")
    missing = missing_toolchain(ctx.device)
    if missing:
        return CheckResult(
            "compiled_step", False, "cannot compile here, missing: " + "; ".join(missing), {"missing": missing}
        )
    n = ctx.shared.get("largest_micro_batch", ctx.micro_batch)
    spec = ctx.spec.model_copy(update={"training": tr.model_copy(update={"accumulate_grad_batches": 1})})
    trainer = Trainer.for_steps(spec, ctx.fresh_net(), ctx.device, ctx.dtype)  # the trainer's step, on a fresh network
    trainer.compute = compile_loss(trainer.loss.compute, tr.fold_zero_tangents, tr.compile_mode)
    graphs, breaks = _counters()
    start = time.perf_counter()
    try:
        applied, metrics = trainer.train_step(ctx.latents(n))
        ctx.sync()
    except Exception as e:  # noqa: BLE001 - the point of the check: say what failed, in one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return CheckResult(
            "compiled_step",
            False,
            f"torch.compile ({tr.compile_mode}) failed: {type(e).__name__}: {first}",
            {"error": f"{type(e).__name__}: {first}"},
        )
    seconds = time.perf_counter() - start
    graphs, breaks = _counters()[0] - graphs, _counters()[1] - breaks
    details: dict[str, Any] = {
        "micro_batch": n,
        "compile_mode": tr.compile_mode,
        "first_step_s": seconds,
        "graphs": graphs,
        "graph_breaks": breaks,
        "loss_total": float(metrics["loss_total"]),
    }
    if graphs < 1:
        return CheckResult("compiled_step", False, "torch.compile produced no graph: the step ran eagerly", details)
    if not applied:
        return CheckResult(
            "compiled_step",
            False,
            f"the compiled step's loss or gradients are not finite (loss {details['loss_total']:.4g})",
            details,
        )
    ctx.shared["compiled"] = (trainer, n)
    return CheckResult(
        "compiled_step",
        True,
        f"compiled ({tr.compile_mode}) and ran one step of {n} in {seconds:.1f} s "
        f"(compile included; {graphs} graph{'s' if graphs != 1 else ''}, {breaks} graph breaks)",
        details,
    )
