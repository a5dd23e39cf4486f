"""What `neuromf bench` measures with: clocks, memory meters, the FLOP counter, and the devices' peak FLOP/s.

Clocks: on a GPU, CUDA events around the data fetch and the step, synchronised
at the end of every step (the step syncs once anyway, to skip non-finite
updates); on a CPU, time.perf_counter, and the process's CPU time of the step
(time.process_time), which other jobs on a shared machine barely change.

Memory: on a GPU, the caching allocator's statistics (peak allocated, peak
reserved) around one step. A CPU has no allocator statistics, and the process's
peak RSS (ru_maxrss) only ever grows, so it cannot tell one variant from the
next. Instead, before the measured step glibc's free heap is handed back to the
kernel (malloc_trim) and the kernel's peak-RSS mark is reset to the current RSS
(writing 5 to /proc/self/clear_refs resets VmHWM); after the step, VmHWM minus
the RSS before it is the step's own peak: activations, gradients, temporaries,
and the heap fragmentation glibc really costs. Where /proc/self/clear_refs
cannot be written, only the lifetime ru_maxrss is reported and the method says so.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one eager step (matmuls,
convolutions and attention, forward, forward-mode and backward); counted once,
outside the timed steps.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "MemoryMeter", "PEAK_TFLOPS", "StepClock", "count_flops", "describe_device", "lookup_peak_tflops", "peak_flops",
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
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    return {"type": device.type, "name": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def peak_flops(device: torch.device, precision: str) -> tuple[Optional[float], str]:
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


def lookup_peak_tflops(device_name: str, kind: str) -> Optional[tuple[float, str]]:
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
    return [{"name": e.key, "calls": int(e.count), "self_ms": self_us(e) / 1e3, "share": self_us(e) / total} for e in events[:top]]


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
    ) -> tuple[float, float, Optional[float]]:
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


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


@dataclass
class MemoryMeter:
    """Peak memory of the code between start() and stop() (see the module docstring)."""

    device: torch.device
    _before: int = 0
    _resettable: Optional[bool] = None

    def _reset_rss_peak(self) -> bool:
        try:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel: RSS ~ live memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            return True
        except OSError:
            return False

    @property
    def in_use_at_start(self) -> int:
        """Bytes in use at start() (GPU: allocated; CPU: resident set; 0 where the RSS peak cannot be reset)."""
        return self._before

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        self._resettable = self._reset_rss_peak()
        self._before = _status_bytes("VmRSS:") if self._resettable else 0

    def stop(self) -> dict[str, Any]:
        """peak_step_bytes: the peak above the memory in use at start(); peak_total_bytes: the absolute peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_step_bytes": peak - self._before, "peak_total_bytes": peak,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "mem_method": "CUDA caching allocator: max_memory_allocated (reset before the step)"}
        if self._resettable:
            peak = _status_bytes("VmHWM:")
            return {"peak_step_bytes": peak - self._before, "peak_total_bytes": peak,
                    "mem_method": "peak RSS of one step: malloc_trim, VmHWM reset via /proc/self/clear_refs, VmHWM - VmRSS before"}
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"peak_step_bytes": None, "peak_total_bytes": maxrss,
                "mem_method": "ru_maxrss: process lifetime, not separable per variant (/proc/self/clear_refs not writable)"}
