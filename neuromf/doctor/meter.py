"""The peak memory of one piece of code (a training step), for `neuromf doctor` and `neuromf bench`.

On a GPU, the caching allocator's statistics (peak allocated, peak
reserved) around one step. A CPU has no allocator statistics, and the process's
peak RSS (ru_maxrss) only ever grows, so it cannot tell one variant from the
next. Instead, before the measured step glibc's free heap is handed back to the
kernel (malloc_trim) and the kernel's peak-RSS mark is reset to the current RSS
(writing 5 to /proc/self/clear_refs resets VmHWM); after the step, VmHWM minus
the RSS before it is the step's own peak: activations, gradients, temporaries,
and the heap fragmentation glibc really costs. Where /proc/self/clear_refs
cannot be written, only the lifetime ru_maxrss is reported and the method says so.
"""

from __future__ import annotations

import ctypes
import gc
import resource
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MemoryMeter", "status_bytes"]


def status_bytes(key: str) -> int:
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
    _resettable: bool | None = None

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
        self._before = status_bytes("VmRSS:") if self._resettable else 0

    def stop(self) -> dict[str, Any]:
        """peak_step_bytes: the peak above the memory in use at start(); peak_total_bytes: the absolute peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {
                "peak_step_bytes": peak - self._before,
                "peak_total_bytes": peak,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                "mem_method": "CUDA caching allocator: max_memory_allocated (reset before the step)",
            }
        if self._resettable:
            peak = status_bytes("VmHWM:")
            return {
                "peak_step_bytes": peak - self._before,
                "peak_total_bytes": peak,
                "mem_method": "peak RSS of one step: malloc_trim, VmHWM reset via /proc/self/clear_refs, VmHWM - VmRSS before",
            }
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "peak_step_bytes": None,
            "peak_total_bytes": maxrss,
            "mem_method": "ru_maxrss: process lifetime, not separable per variant (/proc/self/clear_refs not writable)",
        }
