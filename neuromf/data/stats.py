"""Per-channel normalisation of latents: z_norm = (z - mean) / std, and its inverse for samples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from neuromf.data.latents import read_stats_json
from neuromf.errors import UserError


class LatentStats:
    """Per-channel mean and std (float32 tensors of shape (C,)); channels are dim -4 of a latent."""

    def __init__(
        self, mean: Sequence[float] | np.ndarray | torch.Tensor, std: Sequence[float] | np.ndarray | torch.Tensor
    ) -> None:
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float64), dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float64), dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean has {self.mean.numel()} channels, std has {self.std.numel()}")
        if not bool(torch.isfinite(self.mean).all() & torch.isfinite(self.std).all() & (self.std > 0).all()):
            bad = [c for c in range(self.std.numel()) if not (self.std[c] > 0 and torch.isfinite(self.mean[c]))]
            raise UserError(
                f"latent statistics: channel(s) {bad} have std 0 or non-finite values; cannot normalise "
                "(set data.normalise: false)"
            )

    @classmethod
    def identity(cls, channels: int) -> LatentStats:
        """No normalisation: mean 0, std 1."""
        return cls([0.0] * channels, [1.0] * channels)

    @classmethod
    def from_json(cls, path: Path) -> LatentStats:
        """From latent_stats.json (per_channel.channel_N.mean / .std)."""
        mean, std = read_stats_json(path)
        return cls(mean, std)

    @classmethod
    def from_state_dict(cls, state: dict) -> LatentStats:
        return cls(state["mean"], state["std"])

    def state_dict(self) -> dict[str, list[float]]:
        """Plain lists, for checkpoints and JSON."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def to(self, device: torch.device | str) -> LatentStats:
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


# ---------------------------------------------------------------- latent_stats.json against the data

WARN_RTOL = 0.02  # warn when a value of latent_stats.json is off by more than 2 % of the channel std
REFUSE_RTOL = 0.10  # data.stats 'file': refuse when its mean or std is off by more than 10 % of the channel std


def _extras(path: Path) -> tuple[dict[str, list[float | None]], int | None]:
    """Per-channel min and max (None where absent) and n_files of latent_stats.json, when it has them."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}, None
    per = raw.get("per_channel") if isinstance(raw, dict) else None
    out: dict[str, list[float | None]] = {"min": [], "max": []}
    for c in range(len(per) if isinstance(per, dict) else 0):
        entry = per.get(f"channel_{c}") or {}
        for key in out:
            try:
                out[key].append(float(entry[key]))
            except (KeyError, TypeError, ValueError):
                out[key].append(None)
    n_files = raw.get("n_files") if isinstance(raw, dict) else None
    return out, n_files if isinstance(n_files, int) and not isinstance(n_files, bool) else None


def compare_stats_file(
    path: Path, mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_latents: int | None = None
) -> tuple[list[str], list[str]]:
    """(every disagreement beyond WARN_RTOL, the mean/std ones beyond REFUSE_RTOL) between latent_stats.json
    (mean, std, min, max, n_files) and the statistics of the data. Off-ness is measured in units of the data's
    channel std; each line names the channel, the field and both values."""
    file_mean, file_std = read_stats_json(path)
    if len(file_mean) != len(mean):
        line = f"it has {len(file_mean)} channels, the latents have {len(mean)}"
        return [line], [line]
    extras, n_files = _extras(path)
    warnings, refusals = [], []
    for c in range(len(mean)):
        fields = [("mean", file_mean[c], mean[c]), ("std", file_std[c], std[c])]
        fields += [
            (key, extras[key][c], value)
            for key, value in (("min", lo[c]), ("max", hi[c]))
            if c < len(extras.get(key, [])) and extras[key][c] is not None
        ]
        for key, in_file, in_data in fields:
            off = abs(in_file - in_data) / std[c]
            if off > WARN_RTOL:
                line = (
                    f"channel_{c} {key}: file {in_file:.6g}, data {in_data:.6g} "
                    f"(off by {100 * off:.1f} % of the channel std; tolerance {100 * WARN_RTOL:.0f} %)"
                )
                warnings.append(line)
                if key in ("mean", "std") and off > REFUSE_RTOL:
                    refusals.append(line)
    if n_files is not None and n_latents is not None and n_files != n_latents:
        warnings.append(f"n_files: file {n_files}, data {n_latents} latents")
    return warnings, refusals
