"""What `neuromf bench` measures with: clocks, the FLOP counter, and the devices' peak FLOP/s.

Clocks: on a GPU, CUDA events around the data fetch and the step, synchronised
at the end of every step (the step syncs once anyway, to skip non-finite
updates); on a CPU, time.perf_counter, and the process's CPU time of the step
(time.process_time), which other jobs on a shared machine barely change.

Memory: neuromf/doctor/meter.py (MemoryMeter, shared with `neuromf doctor`).

FLOPs: torch.utils.flop_counter.FlopCounterMode over one eager step (matmuls,
convolutions and attention, forward, forward-mode and backward); counted once,
outside the timed steps.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from neuromf.doctor.meter import MemoryMeter

__all__ = [
    "MemoryMeter",
    "PEAK_TFLOPS",
    "StepClock",
    "count_flops",
    "describe_device",
    "lookup_peak_tflops",
    "peak_flops",
    "versions",
]

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
# "tf32" is what fp32 training runs at when TF32 is allowed (the trainer allows it).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe, 40 and 80 GB
]


def versions() -> dict[str, str]:
    import monai

    out = {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, memory and parallelism of the device the steps run on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    return {
        "type": device.type,
        "name": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s for `precision` on `device`, where the number comes from); (None, why) if unknown."""
    if device.type != "cuda":
        return None, "no peak table for CPUs (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    kind = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32:
        kind = "tf32"
    found = lookup_peak_tflops(name, kind)
    if found is None:
        return None, f"{name!r} is not in the peak table (give --peak-tflops)"
    return found[0] * 1e12, f"{found[1]} dense {kind} data-sheet peak"


def lookup_peak_tflops(device_name: str, kind: str) -> tuple[float, str] | None:
    """(peak TFLOP/s, table key) for a CUDA device name and "bf16" | "tf32" | "fp32"; None if not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks[kind], key
    return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward, forward-mode and backward ops it runs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def top_kernels(fn: Callable[[], Any], device: torch.device, top: int) -> list[dict[str, Any]]:
    """The `top` ops with the most self time in one call of `fn` (torch.profiler; GPU kernel time on CUDA).

    Self time is an op's own time without the ops it calls, so the shares add up to at most 1.
    On a CPU it is CPU time (an ATen op, or an Inductor-generated kernel, e.g. cpp_fused_...).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)

    def self_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [
        {"name": e.key, "calls": int(e.count), "self_ms": self_us(e) / 1e3, "share": self_us(e) / total}
        for e in events[:top]
    ]


class StepClock:
    """Seconds spent fetching the batch and running the step, per iteration."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def iteration(
        self, fetch: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], Any]
    ) -> tuple[float, float, float | None]:
        """Run fetch() then step(batch); return (data wait, step, step CPU time) in seconds, the device idle.

        The CPU time (time.process_time: all threads of this process) is returned on CPU devices
        only: on a machine shared with other jobs, wall time grows with their load while the CPU
        time a step consumes barely does, so ratios of CPU times stay comparable between runs.
        """
        a = self._mark()
        batch = fetch()
        b = self._mark()
        cpu = time.process_time()
        step(batch)
        cpu = time.process_time() - cpu
        c = self._mark()
        if self.cuda:
            c.synchronize()
            return a.elapsed_time(b) / 1e3, b.elapsed_time(c) / 1e3, None
        return b - a, c - b, cpu
