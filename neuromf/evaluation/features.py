"""A feature space for comparing sets of latents that needs no downloaded weights: pooled statistics.

Why this space. FID compares Inception features of 2D photographs; there is
no standard 3D brain-MRI network we may download at run time, and a network
trained on something else would measure its own biases. The latents are
already a learned, compact description of the volumes (the MAISI VAE
encoder's output), so we describe each latent by a few statistics of it:

- layout: the mean of every channel in each cell of a coarse `grid`^3
  partition of the volume (2^3 = octants by default): where the bright and
  dark tissue sits, left/right, front/back, top/bottom;
- texture at several scales: the standard deviation of every channel in each
  cell after average-pooling the latent by each factor in `levels` (1, 2, 4):
  fine-scale noise or blur changes the level-1 std, wrong large structures
  the level-4 std, much as a power spectrum would.

With the defaults that is C * grid^3 * (1 + len(levels)) = 128 numbers for a
4-channel latent: few enough that the covariance in the Fréchet distance is
estimated from hundreds of samples, not the 50,000 FID needs for 2,048
dimensions. Features are computed on NORMALISED latents (the model's space),
so all channels weigh the same. Limits: two sets that agree on these
statistics can still differ in fine shapes; the numbers are for comparing
models and checkpoints against each other at the same N, not for comparing
with published FIDs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FeatureSpec", "DEFAULT_FEATURES", "latent_features", "feature_names"]


@dataclass(frozen=True)
class FeatureSpec:
    """Which pooled statistics make up a feature vector (see the module docstring)."""

    levels: tuple[int, ...] = (1, 2, 4)
    grid: int = 2
    name: str = "pooled-stats-v1"

    def dim(self, channels: int) -> int:
        return channels * self.grid**3 * (1 + len(self.levels))

    def describe(self) -> str:
        return (
            f"per-channel mean in each of {self.grid}^3 cells, plus per-channel std in each cell after "
            f"average-pooling by {', '.join(map(str, self.levels))}; computed on normalised latents"
        )


DEFAULT_FEATURES = FeatureSpec()


def _cell_mean_std(x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of x (B, C, D, H, W) in each cell of a grid^3 partition: (B, C, grid^3) each."""
    m = F.adaptive_avg_pool3d(x, grid)
    q = F.adaptive_avg_pool3d(x * x, grid)
    std = (q - m * m).clamp_min(0.0).sqrt()  # float64: no cancellation worth speaking of
    return m.flatten(2), std.flatten(2)


@torch.no_grad()
def latent_features(x: torch.Tensor, spec: FeatureSpec = DEFAULT_FEATURES) -> torch.Tensor:
    """Feature vectors (B, spec.dim(C)) float64 on the CPU of normalised latents x (B, C, D, H, W).

    Order: [cell means (C x grid^3), then for each level the cell stds (C x grid^3)], channel-major
    inside each block (see `feature_names`).
    """
    if x.dim() != 5:
        raise ValueError(f"latents must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    smallest = min(x.shape[2:])
    if max(spec.levels) * spec.grid > smallest:
        raise ValueError(
            f"latents of side {smallest} are too small for pooling by {max(spec.levels)} on a {spec.grid}^3 grid"
        )
    x = x.detach().to(device="cpu", dtype=torch.float64)
    means, _ = _cell_mean_std(x, spec.grid)
    blocks = [means]
    for level in spec.levels:
        pooled = x if level == 1 else F.avg_pool3d(x, kernel_size=level, stride=level)
        blocks.append(_cell_mean_std(pooled, spec.grid)[1])
    return torch.cat([b.flatten(1) for b in blocks], dim=1)


def feature_names(channels: int, spec: FeatureSpec = DEFAULT_FEATURES) -> list[str]:
    """A readable name for every feature, in `latent_features` order (e.g. 'std_l2_c0_cell5')."""
    cells = spec.grid**3
    names = [f"mean_c{c}_cell{k}" for c in range(channels) for k in range(cells)]
    for level in spec.levels:
        names += [f"std_l{level}_c{c}_cell{k}" for c in range(channels) for k in range(cells)]
    return names
