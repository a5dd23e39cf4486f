"""What the machine offers: versions (torch, CUDA, cuDNN, driver), the device, and the compile toolchain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import torch

from neuromf.doctor.result import CheckResult

__all__ = ["check_device", "check_toolchain", "driver_version", "missing_toolchain"]


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, when it is on PATH."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def check_device(device: torch.device, precision: str) -> CheckResult:
    """The device exists, bf16 is supported when asked for; the versions a bug report needs."""
    import monai

    info: dict[str, Any] = {"torch": torch.__version__, "monai": monai.__version__, "device": device.type}
    if device.type != "cuda":
        info["cpu_threads"] = torch.get_num_threads()
        return CheckResult("device", True, f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}", info)
    props = torch.cuda.get_device_properties(device)
    info.update(
        name=props.name,
        capability=f"{props.major}.{props.minor}",
        memory_bytes=props.total_memory,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        driver=driver_version(),
    )
    text = (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm {props.major}.{props.minor}); torch {torch.__version__}, "
        f"CUDA {info['cuda']}, cuDNN {info['cudnn']}, driver {info['driver'] or 'unknown (no nvidia-smi)'}"
    )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return CheckResult("device", False, f"training.precision bf16: not supported by {props.name}; use fp32", info)
    return CheckResult("device", True, text, info)


def _python_headers() -> Path | None:
    include = sysconfig.get_paths().get("include")
    header = Path(include) / "Python.h" if include else None
    return header if header is not None and header.is_file() else None


def _libcuda() -> bool:
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        return True
    try:  # not on the linker path, but loadable (e.g. injected by apptainer --nv under /.singularity.d/libs)
        import ctypes

        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def missing_toolchain(device: torch.device) -> list[str]:
    """What torch.compile needs and this machine lacks (empty: all there).

    Inductor's CPU kernels are C++ (g++ or $CXX) including Python.h; on a GPU, Triton builds a small C
    launcher at run time (cc/gcc/clang or $CC, Python.h) and loads libcuda.
    """
    missing = []
    if device.type == "cuda":
        cc = os.environ.get("CC")
        if not ((cc and shutil.which(cc)) or any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
            missing.append("a C compiler (cc, gcc or clang on PATH, or $CC) for Triton's launcher")
        if not _libcuda():
            missing.append("libcuda (the NVIDIA driver library; with Apptainer use --nv)")
    else:
        cxx = os.environ.get("CXX") or "g++"
        if not shutil.which(cxx):
            missing.append(f"a C++ compiler ({cxx} on PATH, or $CXX) for Inductor's CPU kernels")
    if _python_headers() is None:
        missing.append(f"the Python headers (Python.h under {sysconfig.get_paths().get('include')}; e.g. python3-dev)")
    return missing


def check_toolchain(device: torch.device, compile_on: bool) -> CheckResult:
    missing = missing_toolchain(device)
    details = {"missing": missing, "CC": os.environ.get("CC"), "CXX": os.environ.get("CXX")}
    if not missing:
        return CheckResult(
            "toolchain",
            True,
            "compiler, Python headers"
            + (" and libcuda" if device.type == "cuda" else "")
            + " present for torch.compile",
            details,
        )
    if not compile_on:
        return CheckResult(
            "toolchain", None, "training.compile is off; torch.compile would lack: " + "; ".join(missing), details
        )
    return CheckResult(
        "toolchain", False, "torch.compile cannot build kernels here; missing: " + "; ".join(missing), details
    )
