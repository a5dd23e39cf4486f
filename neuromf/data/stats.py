"""Per-channel normalisation of latents: z_norm = (z - mean) / std, and its inverse for samples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from neuromf.data.latents import read_stats_json
from neuromf.errors import UserError


class LatentStats:
    """Per-channel mean and std (float32 tensors of shape (C,)); channels are dim -4 of a latent."""

    def __init__(self, mean: Sequence[float] | np.ndarray | torch.Tensor, std: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float64), dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float64), dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean has {self.mean.numel()} channels, std has {self.std.numel()}")
        if not bool(torch.isfinite(self.mean).all() & torch.isfinite(self.std).all() & (self.std > 0).all()):
            bad = [c for c in range(self.std.numel()) if not (self.std[c] > 0 and torch.isfinite(self.mean[c]))]
            raise UserError(f"latent statistics: channel(s) {bad} have std 0 or non-finite values; cannot normalise "
                            "(set data.normalise: false)")

    @classmethod
    def identity(cls, channels: int) -> "LatentStats":
        """No normalisation: mean 0, std 1."""
        return cls([0.0] * channels, [1.0] * channels)

    @classmethod
    def from_json(cls, path: Path) -> "LatentStats":
        """From latent_stats.json (per_channel.channel_N.mean / .std)."""
        mean, std = read_stats_json(path)
        return cls(mean, std)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LatentStats":
        return cls(state["mean"], state["std"])

    def state_dict(self) -> dict[str, list[float]]:
        """Plain lists, for checkpoints and JSON."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def to(self, device: torch.device | str) -> "LatentStats":
        out = LatentStats.__new__(LatentStats)
        out.mean, out.std = self.mean.to(device), self.std.to(device)
        return out

    def _view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 4 or x.shape[-4] != self.channels:
            raise ValueError(f"expected (..., {self.channels}, D, H, W), got {tuple(x.shape)}")
        shape = (self.channels, 1, 1, 1)
        return self.mean.to(x.device, x.dtype).view(shape), self.std.to(x.device, x.dtype).view(shape)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel; x is (C, D, H, W) or (B, C, D, H, W)."""
        mean, std = self._view(x)
        return (x - mean) / std

    def normalise_(self, x: torch.Tensor) -> torch.Tensor:
        """normalise in place (same arithmetic, one pass less memory traffic); returns x."""
        mean, std = self._view(x)
        return x.sub_(mean).div_(std)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """x * std + mean per channel: back to the latent scale the VAE expects (then divide by scale_factor)."""
        mean, std = self._view(x)
        return x * std + mean

    def __repr__(self) -> str:
        return f"LatentStats(mean={[round(v, 4) for v in self.mean.tolist()]}, std={[round(v, 4) for v in self.std.tolist()]})"
