"""The device a run works on and the network's precision there, decided in one place.

`pick_device` resolves the run-spec's `hardware.device` (auto: CUDA when a GPU is visible), `resolve_device`
the `--device` flag of `sample`/`evaluate`/`verify`. `autocast_dtype` decides the precision from the
RESOLVED device, never from the run-spec alone: training, sampling, the VAE decode and `neuromf doctor`
all ask it, so none of them can autocast where the others do not.
"""

from __future__ import annotations

import torch

from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["autocast_dtype", "pick_device", "resolve_device"]


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """'auto' (CUDA when visible), 'cpu', 'cuda' or 'cuda:N'; anything else, or a GPU that is not there, is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{what} {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{what} {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what} {name}: no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{what} {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def pick_device(spec: RunSpec) -> torch.device:
    """The device `hardware.device` names on this machine."""
    return resolve_device(spec.hardware.device, "hardware.device")


def autocast_dtype(spec: RunSpec, device: torch.device) -> torch.dtype | None:
    """The network's autocast dtype on the resolved device (None: plain fp32): bf16 only on a GPU.

    On a CPU, bf16 autocast gives NaN gradients through the JVP, so `precision: bf16` with
    `hardware.device: auto` on a machine without a GPU runs in fp32 (`device: cpu` + bf16 is refused
    by the run-spec check).
    """
    return torch.bfloat16 if spec.training.precision == "bf16" and torch.device(device).type == "cuda" else None
