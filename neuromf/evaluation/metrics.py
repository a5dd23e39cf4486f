"""Distances between sets of samples and per-channel statistics of latents (float64 numpy).

- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussian fits (FID's formula).
  The trace of the matrix square root is computed as the sum of the square roots of the
  eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix: stable when the covariances are
  singular (fewer samples than features), where scipy's sqrtm of S1 S2 turns complex.
- `mmd2_rbf`: the unbiased squared maximum mean discrepancy with Gaussian kernels of several bandwidths
  (KID's idea with an RBF kernel). ~0 for sets from the same distribution (it can dip slightly below
  0), up to 2 for disjoint ones.
- `MomentAccumulator`: per-channel mean, std, skewness, excess kurtosis over any number of batches,
  identical to scipy.stats.skew / kurtosis (population, bias=True) on the concatenated values.
- `mean_pairwise_distance`: RMS per-element distance averaged over all pairs: low values mean the
  samples look alike (mode collapse).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "MomentAccumulator",
    "GaussianAccumulator",
    "frechet_distance",
    "frechet_distance_of_fits",
    "ms_ssim_diversity",
    "gaussian_fit",
    "histogram_overlap",
    "mean_pairwise_distance",
    "median_pairwise_distance",
    "mmd2_rbf",
]


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (ddof 1) of features (N, F); N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N1, F) and (N2, F)."""
    return frechet_distance_of_fits(*gaussian_fit(a), *gaussian_fit(b))


def frechet_distance_of_fits(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussian fits (mean, covariance)."""
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sets differ in dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    r = _psd_sqrt(s1)
    middle = r @ s2 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


class GaussianAccumulator:
    """Mean and covariance (ddof 1) of feature rows fed in batches: float64 sums about the first batch's mean.

    The 2.5D FID has one row per slice (about 100,000 rows of 2,048 for 500 volumes): the sums hold them in
    two F x F matrices instead of gigabytes of rows.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(0)
        self.s2 = np.zeros((0, 0))

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1, self.s2 = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        d = x - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.T @ d
        self.n += x.shape[0]

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2 or self.shift is None:
            raise ValueError(f"need at least 2 feature rows, got {self.n}")
        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (cov + cov.T) / 2


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.clip(d, 0.0, None)


def median_pairwise_distance(x: np.ndarray) -> float:
    """Median Euclidean distance between distinct rows of x (the usual kernel-bandwidth heuristic)."""
    x = np.asarray(x, dtype=np.float64)
    d = _sq_dists(x, x)[np.triu_indices(x.shape[0], k=1)]
    return float(np.sqrt(np.median(d))) if d.size else 1.0


def mmd2_rbf(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float]) -> dict[float, float]:
    """Unbiased MMD^2 between rows of x (N, F) and y (M, F) for k(a, b) = exp(-|a - b|^2 / (2 s^2)), per bandwidth s."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 samples in each set")
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    out = {}
    for s in bandwidths:
        g = 1.0 / (2.0 * s * s)
        kxx, kyy, kxy = np.exp(-g * dxx), np.exp(-g * dyy), np.exp(-g * dxy)
        out[float(s)] = float(
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2.0 * kxy.mean()
        )
    return out


class MomentAccumulator:
    """Per-channel moments of latents (B, C, ...) fed in batches; float64 power sums about a shift.

    The shift (the first batch's channel means) keeps the raw power sums from cancelling when
    the mean is large against the spread.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sums = np.zeros((4, 0))

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().to(device="cpu", dtype=torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        if self.shift is None:
            self.shift = v.mean(1).numpy()
            self.sums = np.zeros((4, v.shape[0]))
        d = v - torch.from_numpy(self.shift)[:, None]
        p = d.clone()
        for k in range(4):
            self.sums[k] += p.sum(1).numpy()
            if k < 3:
                p.mul_(d)
        self.n += v.shape[1]

    def result(self) -> list[dict[str, float]]:
        """[{'mean', 'std', 'skewness', 'kurtosis'} per channel]; std is the population std, kurtosis is excess."""
        if self.n == 0 or self.shift is None:
            return []
        e1, e2, e3, e4 = (self.sums[k] / self.n for k in range(4))
        m2 = e2 - e1**2
        m3 = e3 - 3 * e1 * e2 + 2 * e1**3
        m4 = e4 - 4 * e1 * e3 + 6 * e1**2 * e2 - 3 * e1**4
        m2 = np.clip(m2, 0.0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(m2 > 0, m3 / m2**1.5, 0.0)
            kurt = np.where(m2 > 0, m4 / m2**2 - 3.0, 0.0)
        mean = self.shift + e1
        return [
            {
                "mean": float(mean[c]),
                "std": float(np.sqrt(m2[c])),
                "skewness": float(skew[c]),
                "kurtosis": float(kurt[c]),
            }
            for c in range(mean.shape[0])
        ]


def histogram_overlap(p: np.ndarray, q: np.ndarray) -> float:
    """Shared probability mass of two histograms over the same bins: 1 identical, 0 disjoint."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(np.minimum(p / p.sum(), q / q.sum()).sum())


@torch.no_grad()
def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean over pairs i < j of ||x_i - x_j|| / sqrt(numel per sample) (an RMS per-element distance)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    flat = x.detach().reshape(n, -1).to(torch.float64)
    sq = (flat * flat).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0)
    iu = torch.triu_indices(n, n, offset=1)
    return float((d2[iu[0], iu[1]] / flat.shape[1]).sqrt().mean())


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def ms_ssim_settings(side: int, kernel_size: int = 11) -> tuple[int, tuple[float, ...]]:
    """(kernel size, scale weights) for volumes of smallest side `side`: MONAI's 5 scales where they fit.

    MONAI's compute_ms_ssim needs side // (scales - 1)^2 > kernel - 1 and the coarsest scale at least as
    large as the kernel; small volumes get fewer scales (weights renormalised to sum 1) and, below that, a
    smaller odd kernel.
    """

    def fits(scales: int, k: int) -> bool:
        return side // max(1, scales - 1) ** 2 > k - 1 and side // 2 ** (scales - 1) >= k

    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if fits(scales, kernel_size):
            w = np.asarray(MS_SSIM_WEIGHTS[:scales])
            return kernel_size, tuple(float(v) for v in w / w.sum())
    for k in range(kernel_size - 2, 2, -2):
        if fits(1, k):
            return k, (1.0,)
    raise ValueError(f"volumes of side {side} are too small for MS-SSIM")


@torch.no_grad()
def ms_ssim_diversity(volumes: torch.Tensor, kernel_size: int = 11) -> dict[str, Any]:
    """Mean MS-SSIM over all pairs i < j of volumes (B, 1, X, Y, Z), each min-max scaled to [0, 1] (data range 1).

    Lower = more diverse. MONAI's compute_ms_ssim (Gaussian kernel, sigma 1.5) on every pair.
    """
    from monai.metrics.regression import compute_ms_ssim

    b = volumes.shape[0]
    if b < 2:
        return {"mean": float("nan"), "pairs": 0}
    v = volumes[:, :1].to(torch.float32)
    lo = v.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = v.amax(dim=(1, 2, 3, 4), keepdim=True)
    v = (v - lo) / (hi - lo).clamp_min(1e-8)
    k, weights = ms_ssim_settings(min(v.shape[2:]), kernel_size)
    i, j = torch.triu_indices(b, b, offset=1)
    values = []
    for start in range(0, i.numel(), 8):
        a, c = v[i[start : start + 8]], v[j[start : start + 8]]
        values.append(compute_ms_ssim(a, c, spatial_dims=3, data_range=1.0, kernel_size=k, weights=weights).flatten())
    return {
        "mean": float(torch.cat(values).double().mean()),
        "pairs": int(i.numel()),
        "kernel_size": k,
        "weights": list(weights),
    }
