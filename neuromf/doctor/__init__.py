"""`neuromf doctor SPEC`: can this machine run this run-spec? One PASS/FAIL/SKIP line per check, a JSON report.

    from neuromf.doctor import run_doctor
    results = run_doctor(spec, on_result=lambda r: print(r.line()))

The checks, each in its own function (one module per concept):
  device          the device exists; versions of torch, CUDA, cuDNN and the driver     (environment.py)
  toolchain       what torch.compile needs: C/C++ compiler, Python headers, libcuda     (environment.py)
  conv3d_bf16     the network's convolutions at the run's shapes, bf16 against fp32    (numerics.py)
  forward_bf16    the whole network at bf16 autocast against fp32                      (numerics.py)
  jvp             the loss's du/dt at the run's precision against a finite difference  (numerics.py)
  memory          the micro-batch's peak; if it does not fit, the setting that does    (memory.py)
  compiled_step   one compiled step of the run's loss, no fallback to eager            (compiled.py)
  throughput      seconds per optimizer step and the projected run length              (throughput.py)
  data_residency  where the latents will live and their memory                         (residency.py)
A check that does not apply (bf16 checks of an fp32 run, compile of an eager one) is a SKIP. A check
that raises is a FAIL with the error's first line; the others still run.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from typing import Any

from neuromf.doctor.result import CheckResult, write_report
from neuromf.spec.schema import RunSpec

__all__ = ["CHECK_NAMES", "CheckResult", "report_header", "run_doctor", "write_report"]

CHECK_NAMES = [
    "device",
    "toolchain",
    "conv3d_bf16",
    "forward_bf16",
    "jvp",
    "memory",
    "compiled_step",
    "throughput",
    "data_residency",
]


def _checks() -> dict[str, Callable[[Any], CheckResult]]:
    from neuromf.doctor.compiled import check_compiled_step
    from neuromf.doctor.environment import check_device, check_toolchain
    from neuromf.doctor.memory import check_memory
    from neuromf.doctor.numerics import check_conv3d_bf16, check_forward_bf16, check_jvp
    from neuromf.doctor.residency import check_residency
    from neuromf.doctor.throughput import check_throughput

    return {
        "device": lambda ctx: check_device(ctx.device, ctx.spec.training.precision),
        "toolchain": lambda ctx: check_toolchain(ctx.device, ctx.spec.training.compile),
        "conv3d_bf16": check_conv3d_bf16,
        "forward_bf16": check_forward_bf16,
        "jvp": check_jvp,
        "memory": check_memory,
        "compiled_step": check_compiled_step,
        "throughput": check_throughput,
        "data_residency": check_residency,
    }


def report_header(spec: RunSpec) -> dict[str, Any]:
    return {
        "neuromf_doctor": 1,
        "spec": spec.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_doctor(
    spec: RunSpec, only: list[str] | None = None, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Run the checks (all, or those named in `only`, in their fixed order); return their results."""
    from neuromf.doctor.context import DoctorContext

    ctx = DoctorContext.build(spec)
    results = []
    for name, check in _checks().items():
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        try:
            result = check(ctx)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            first = (str(e).strip().splitlines() or [""])[0][:300]
            result = CheckResult(name, False, f"the check itself failed: {type(e).__name__}: {first}")
            ctx.free()
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
