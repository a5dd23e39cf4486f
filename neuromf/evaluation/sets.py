"""Everything `neuromf evaluate` gathers about one set of latents (generated or real), batch by batch.

Per set: Gaussian fits of the feature rows of each plane (for FID), one feature vector per volume (for MMD),
per-channel moments and histograms of the de-normalised latents (P4-T7), the first latents (for the latent
diversity) and, in image space, the first volumes (for the MS-SSIM diversity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from neuromf.evaluation.featurize import Featurizer
from neuromf.evaluation.metrics import GaussianAccumulator, MomentAccumulator, mean_pairwise_distance

__all__ = ["SetStats", "reference_batches", "take", "available", "DIVERSITY_N"]

DIVERSITY_N = 100  # pairs of up to 100 latents: 4,950 distances, plenty for a mean


class SetStats:
    def __init__(self, edges: np.ndarray, featurizer: Featurizer, keep_volumes: int = 0) -> None:
        self.edges, self.featurizer = edges, featurizer
        self.fits: dict[str, GaussianAccumulator] = {}
        self.per_volume: list[np.ndarray] = []
        self.moments = MomentAccumulator()
        self.counts = np.zeros((edges.shape[0], edges.shape[1] - 1))
        self.outside = np.zeros(edges.shape[0])
        self.total = 0
        self.keep: list[torch.Tensor] = []
        self.kept = 0
        self.keep_volumes = keep_volumes
        self.volumes: list[torch.Tensor] = []
        self.volumes_kept = 0

    def add(self, normalised: torch.Tensor, raw: torch.Tensor, feature_rows: int | None = None) -> None:
        """Add a batch; features of its first `feature_rows` latents only (all by default, none with 0)."""
        rows_wanted = normalised.shape[0] if feature_rows is None else min(feature_rows, normalised.shape[0])
        if rows_wanted > 0:
            images = self.featurizer.images(normalised[:rows_wanted], raw[:rows_wanted])
            b = images.shape[0]
            per_volume = []
            for plane, rows in self.featurizer.features(images).items():
                rows_np = rows.numpy()
                self.fits.setdefault(plane, GaussianAccumulator()).add(rows_np)
                per_volume.append(rows_np.reshape(b, -1, rows_np.shape[1]).mean(1))  # slices of a volume averaged
            self.per_volume.append(np.concatenate(per_volume, axis=1))
            if self.volumes_kept < self.keep_volumes:
                part = images[: self.keep_volumes - self.volumes_kept]
                lo = part.amin(dim=(1, 2, 3, 4), keepdim=True)
                hi = part.amax(dim=(1, 2, 3, 4), keepdim=True)
                self.volumes.append(((part - lo) / (hi - lo).clamp_min(1e-8)).half())  # [0, 1]: fp16 halves the memory
                self.volumes_kept += part.shape[0]
        self.moments.update(raw)
        values = raw.detach().float().cpu().transpose(0, 1).reshape(raw.shape[1], -1).numpy()
        for c in range(values.shape[0]):
            counts, _ = np.histogram(values[c], bins=self.edges[c])
            self.counts[c] += counts
            self.outside[c] += values.shape[1] - counts.sum()
        self.total += values.shape[1]
        if self.kept < DIVERSITY_N:
            part = normalised[: DIVERSITY_N - self.kept].detach().float().cpu()
            self.keep.append(part)
            self.kept += part.shape[0]

    def vectors(self) -> np.ndarray:
        """One feature vector per volume (N, F); for 2.5D the per-plane means of its slices, side by side."""
        return np.concatenate(self.per_volume) if self.per_volume else np.zeros((0, 0))

    def diversity(self) -> float:
        return mean_pairwise_distance(torch.cat(self.keep)) if self.keep else math.nan

    def ms_ssim(self) -> dict[str, Any] | None:
        from neuromf.evaluation.metrics import ms_ssim_diversity

        return ms_ssim_diversity(torch.cat(self.volumes).float()) if self.volumes_kept >= 2 else None

    def densities(self) -> np.ndarray:
        widths = np.diff(self.edges, axis=1)
        return self.counts / max(self.total, 1) / widths


def reference_batches(data: Any, which: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised reference latents: a held-out split (val, test) in order, or the training split in its epoch-0 order."""
    if which in ("val", "test"):
        yield from getattr(data, f"{which}_batches")(batch_size)
        return
    batches = data.train_batches(batch_size)
    try:
        for _ in range(batches.steps_per_epoch):
            yield batches.next_batch()
    finally:
        batches.close()


def take(batches: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    got = 0
    for b in batches:
        b = b[: n - got]
        got += b.shape[0]
        yield b
        if got >= n:
            return


def available(data: Any, which: str, batch_size: int) -> int:
    if which in ("val", "test"):
        return len(getattr(data, f"{which}_names", None) or [])
    return (len(data.train_names) // batch_size) * batch_size  # whole batches of the epoch-0 order
