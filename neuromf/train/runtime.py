"""What a run-spec asks of the process: the device, threads, seeds and determinism, precision, run length.

Shared by `neuromf train` (neuromf/train/loop.py) and `neuromf bench`, so both run the same set-up.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["autocast_dtype", "configure_torch", "pick_device", "total_steps"]


def pick_device(spec: RunSpec) -> torch.device:
    wanted = spec.hardware.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("hardware.device: 'cuda' requested but no CUDA GPU is visible")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def configure_torch(spec: RunSpec, device: torch.device) -> None:
    if spec.hardware.num_threads:
        torch.set_num_threads(spec.hardware.num_threads)
    if spec.paths.cache_dir is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(spec.paths.cache_dir))
    torch.manual_seed(spec.training.seed)
    if spec.training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(spec: RunSpec, device: torch.device) -> Optional[torch.dtype]:
    """The network's autocast dtype on the resolved device: bf16 only on a GPU.

    On a CPU, bf16 autocast gives NaN gradients through the JVP, so `precision: bf16` with
    `hardware.device: auto` on a machine without a GPU runs in fp32 (`device: cpu` + bf16 is refused
    by the run-spec check).
    """
    return torch.bfloat16 if spec.training.precision == "bf16" and device.type == "cuda" else None


def total_steps(spec: RunSpec, steps_per_epoch: int) -> int:
    return spec.training.max_steps or steps_per_epoch * spec.training.max_epochs
