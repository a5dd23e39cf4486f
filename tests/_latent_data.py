"""Small real latent folders for the data tests: random (4, 16, 16, 16) tensors saved as .pt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPE = (4, 16, 16, 16)


def make_latent(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """A random latent with per-channel offsets and scales, so normalisation has something to do."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-4]
    mean = torch.arange(c, dtype=torch.float32).view(c, 1, 1, 1) - 1.5
    std = 0.5 + 0.25 * torch.arange(c, dtype=torch.float32).view(c, 1, 1, 1)
    return torch.randn(shape, generator=g) * std + mean


def write_latents(folder: Path, n: int, *, start: int = 0, prefix: str = "sub-") -> dict[str, torch.Tensor]:
    """n latent files named sub-000.pt, ...; returns name -> tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(start, start + n):
        name = f"{prefix}{i:03d}"
        out[name] = make_latent(i)
        torch.save(out[name], folder / f"{name}.pt")
    return out


def numpy_stats(tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-channel float64 statistics computed the plain numpy way."""
    x = np.stack([t.double().numpy() for t in tensors])  # (N, C, D, H, W)
    x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return {"mean": x.mean(axis=1), "std": x.std(axis=1), "min": x.min(axis=1), "max": x.max(axis=1)}


def write_stats_json(folder: Path, mean: Any, std: Any) -> Path:
    path = folder / "latent_stats.json"
    per = {f"channel_{c}": {"mean": float(m), "std": float(s)} for c, (m, s) in enumerate(zip(mean, std))}
    path.write_text(json.dumps({"per_channel": per, "n_files": 3}))
    return path
