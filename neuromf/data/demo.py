"""The embedded demo dataset: 4-channel "latents" made from the MNI152 template that nilearn ships.

A fresh clone can train something real without the cluster's data. Every volume
is the ICBM152 2009a template (T1, grey matter, white matter, and CSF = brain
mask minus GM minus WM) cropped to the brain, resampled to a `size`^3 cube, then
warped by a random smooth deformation and a small random affine, with random
intensity gain/bias/gamma and a little noise. The files match the real data's
format (docs/design.md, 'Latent files'): one float32 tensor (4, D, H, W) per `.pt` file and
`latent_stats.json` with per-channel mean and std. Channel 0 is the T1 image,
so a demo sample shown with the identity "decoder" is a brain.

Axes (D, H, W) follow the NIfTI voxel order of the template, RAS: D runs
left->right, H posterior->anterior, W inferior->superior.

Nothing is downloaded: nilearn carries these templates inside its package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from neuromf.errors import UserError

if TYPE_CHECKING:
    from neuromf.spec.schema import RunSpec

log = logging.getLogger(__name__)

# Bump when the volumes this module makes change for the same (n, size, seed): old sets get rebuilt.
GENERATOR_VERSION = 1
SOURCE_TAG = "neuromf-demo"  # latent_stats.json["source"]: marks a folder as a demo set
STATS_NAME = "latent_stats.json"
CHANNELS = ("t1", "grey_matter", "white_matter", "csf")
MASK_THRESHOLD = 0.2  # T1 > this is the brain, as in nilearn.datasets.load_mni152_brain_mask
MARGIN = 0.06  # empty border (fraction of the cube side, each side) so warps keep the brain inside

# Augmentation strengths. Coordinates are normalised: the cube spans [-1, 1], so 1 voxel = 2 / size.
DEFORM_GRID = 5  # control points per axis of the smooth displacement field
DEFORM_STD = 0.06  # displacement std at the control points (~1 voxel at 32^3)
ROTATE_STD_DEG = 4.0
SCALE_RANGE = 0.06  # per-axis scale in [1 - r, 1 + r]
SHIFT_STD = 0.02
GAIN_RANGE = 0.10
BIAS_STD = 0.02
GAMMA_LOG_STD = 0.10
NOISE_STD = 0.015


def volume_name(index: int) -> str:
    """File stem of demo volume `index` (demo_0000, demo_0001, ...)."""
    return f"demo_{index:04d}"


def _anatomy_1mm() -> tuple[np.ndarray, np.ndarray]:
    """(tissue maps (4, X, Y, Z) float32 cropped to a brain-centred cube, brain mask of the cube), at 1 mm.

    Not cached: ~170 MB at 1 mm; the small per-size resamplings of `_templates` are what is kept.
    """
    # nilearn.datasets pulls in scikit-learn (~2 s), so import it only when a demo set is built.
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = np.asarray(load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    gm = np.asarray(load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = t1 > MASK_THRESHOLD
    # CSF (ventricles, sulci) = what is brain but neither grey nor white matter.
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask

    # Crop to the brain's bounding box, then pad (centred) to a cube with a margin.
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    side = int(np.ceil((hi - lo).max() * (1 + 2 * MARGIN)))
    cube = np.zeros((4, side, side, side), np.float32)
    cube_mask = np.zeros((side, side, side), np.float32)
    at = [(side - (h - low)) // 2 for low, h in zip(lo, hi)]
    dst = tuple(slice(a, a + (h - low)) for a, low, h in zip(at, lo, hi))
    src = tuple(slice(low, h) for low, h in zip(lo, hi))
    for c, vol in enumerate((t1, gm, wm, csf)):
        cube[(c, *dst)] = vol[src]
    cube_mask[dst] = mask[src]
    return cube, cube_mask


@lru_cache(maxsize=4)
def _templates(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(source (1, 4, S2, S2, S2) at about twice `size` for sampling, brain mask (size,)*3 bool). Cached per size."""
    cube, cube_mask = _anatomy_1mm()
    side = cube.shape[-1]
    # Area averaging is the anti-aliased downsampling; twice the output size keeps the warp's resampling sharp.
    src_side = min(2 * size, side)
    source = F.interpolate(torch.from_numpy(cube)[None], size=(src_side,) * 3, mode="area")
    mask = F.interpolate(torch.from_numpy(cube_mask)[None, None], size=(size,) * 3, mode="area")[0, 0]
    return source.contiguous(), (mask.numpy() > 0.5)


def demo_brain_mask(size: int) -> np.ndarray:
    """The undeformed template's brain mask (T1 > 0.2) on the demo grid: bool array (size, size, size)."""
    return _templates(size)[1].copy()


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation from three angles (about D, H, W axes)."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@lru_cache(maxsize=4)
def _spline_upsampler(size: int) -> np.ndarray:
    """(size, DEFORM_GRID) matrix: 1-D cubic-spline upsampling of the control points (scipy's zoom, order 3).

    Spline zoom is separable, so applying this matrix along each axis equals a 3-D zoom, at a fraction of the cost.
    """
    from scipy.ndimage import zoom

    eye = np.eye(DEFORM_GRID)
    return np.stack([zoom(e, size / DEFORM_GRID, order=3, mode="nearest") for e in eye], 1)


@lru_cache(maxsize=4)
def _voxel_centres(size: int) -> np.ndarray:
    """Output voxel centres (S, S, S, 3) as (d, h, w) in normalised coordinates (align_corners=False)."""
    axis = (2 * np.arange(size) + 1) / size - 1
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)


def _sampling_grid(rng: np.random.Generator, size: int) -> torch.Tensor:
    """grid_sample grid (1, S, S, S, 3): random affine plus a smooth random displacement of the output voxels."""
    coords = _voxel_centres(size)

    matrix = _rotation(np.deg2rad(rng.normal(0, ROTATE_STD_DEG, 3))) @ np.diag(
        rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE, 3)
    )
    shift = rng.normal(0, SHIFT_STD, 3)
    # Cubic-spline upsampling of a coarse random field: smooth, low-frequency displacement.
    coarse = rng.normal(0, DEFORM_STD, (3, DEFORM_GRID, DEFORM_GRID, DEFORM_GRID))
    up = _spline_upsampler(size)
    disp = np.einsum("ai,bj,ck,nijk->abcn", up, up, up, coarse, optimize=True)
    grid = coords @ matrix.T + shift + disp
    # grid_sample wants the last dim as (x, y, z) = (W, H, D).
    return torch.from_numpy(grid[..., ::-1].astype(np.float32).copy())[None]


def _jitter(rng: np.random.Generator, volume: torch.Tensor) -> torch.Tensor:
    """Per-channel gamma, gain and bias, then Gaussian noise (drawn from `rng`, so deterministic)."""
    c = volume.shape[0]
    gamma = torch.from_numpy(np.exp(rng.normal(0, GAMMA_LOG_STD, c)).astype(np.float32)).view(c, 1, 1, 1)
    gain = torch.from_numpy(rng.uniform(1 - GAIN_RANGE, 1 + GAIN_RANGE, c).astype(np.float32)).view(c, 1, 1, 1)
    bias = torch.from_numpy(rng.normal(0, BIAS_STD, c).astype(np.float32)).view(c, 1, 1, 1)
    noise = torch.from_numpy(rng.standard_normal(volume.shape, dtype=np.float32)) * NOISE_STD
    return volume.clamp(0, 1).pow(gamma) * gain + bias + noise


def make_demo_volume(size: int, seed: int, index: int) -> torch.Tensor:
    """Demo volume `index` of the set for `seed`: float32 (4, size, size, size), independent of the set's length."""
    source, _ = _templates(size)
    # One stream per (seed, index): volume i is the same whether the set has 64 or 128 volumes.
    rng = np.random.default_rng([seed, index])
    grid = _sampling_grid(rng, size)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return _jitter(rng, warped).contiguous()


def read_demo_info(folder: Path) -> dict[str, Any] | None:
    """The demo set's latent_stats.json as a dict if `folder` holds a demo set, else None."""
    try:
        info = json.loads((Path(folder) / STATS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not str(info.get("source", "")).startswith(SOURCE_TAG):
        return None
    return info


def _fsync_write(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def build_demo_dataset(out_dir: Path, n_volumes: int, size: int, seed: int) -> Path:
    """Write `n_volumes` demo volumes (demo_NNNN.pt) and latent_stats.json into `out_dir`; returns `out_dir`.

    Built in a temporary folder beside `out_dir` and renamed into place when complete, so an
    interrupted build leaves nothing that looks complete. An existing demo set at `out_dir` is
    replaced; any other non-empty folder is refused with a UserError.
    """
    out_dir = Path(out_dir)
    if n_volumes < 1:
        raise UserError(f"n_volumes: must be >= 1, got {n_volumes}")
    if size < 8:
        raise UserError(f"size: must be >= 8, got {size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and read_demo_info(out_dir) is None:
        raise UserError(f"{out_dir}: folder is not empty and is not a demo dataset; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # The tensors are small: one thread is several times faster than two on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = np.zeros(len(CHANNELS), np.float64)
        total_sq = np.zeros(len(CHANNELS), np.float64)
        names = []
        for i in range(n_volumes):
            volume = make_demo_volume(size, seed, i)
            v64 = volume.double()
            total += v64.sum(dim=(1, 2, 3)).numpy()
            total_sq += (v64 * v64).sum(dim=(1, 2, 3)).numpy()
            names.append(volume_name(i) + ".pt")
            _fsync_write(tmp / names[-1], lambda f, v=volume: torch.save(v, f))
        count = n_volumes * size**3
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))  # population std (ddof=0)
        info = {
            "per_channel": {
                f"channel_{c}": {"mean": float(mean[c]), "std": float(std[c])} for c in range(len(CHANNELS))
            },
            "source": f"{SOURCE_TAG} (MNI152 ICBM 2009a template shipped with nilearn)",
            "generator_version": GENERATOR_VERSION,
            "n_volumes": n_volumes,
            "size": size,
            "seed": seed,
            "shape": [len(CHANNELS), size, size, size],
            "dtype": "float32",
            "channels": list(CHANNELS),
            "axes": "D: left->right, H: posterior->anterior, W: inferior->superior (RAS voxel order)",
            "files": names,
        }
        _fsync_write(tmp / STATS_NAME, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a data folder should read like any other

        # Swap into place: an old demo set is moved aside first (rename cannot replace a non-empty folder).
        old: Path | None = None
        if out_dir.is_dir() and any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "set")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def demo_dir(spec: RunSpec) -> Path:
    """Where a run keeps its demo set: <paths.run_dir>/data/demo."""
    return Path(spec.paths.run_dir) / "data" / "demo"


def demo_params(spec: RunSpec) -> tuple[int, int, int]:
    """(n_volumes, size, seed) of the run's demo set; size defaults to the model's (cubic) spatial size."""
    demo = spec.data.demo
    size = demo.size if demo.size is not None else int(spec.model.spatial_size[0])
    return int(demo.n_volumes), int(size), int(demo.seed)


def demo_is_current(folder: Path, n_volumes: int, size: int, seed: int) -> bool:
    """True when `folder` holds a complete demo set built with these parameters by this generator version."""
    info = read_demo_info(folder)
    if info is None:
        return False
    wanted = {"n_volumes": n_volumes, "size": size, "seed": seed, "generator_version": GENERATOR_VERSION}
    if any(info.get(k) != v for k, v in wanted.items()):
        return False
    return all((Path(folder) / (volume_name(i) + ".pt")).is_file() for i in range(n_volumes))


def ensure_demo_dataset(spec: RunSpec) -> Path:
    """For `data.source: demo`: build <run_dir>/data/demo if absent or built with other parameters; return it."""
    folder = demo_dir(spec)
    n_volumes, size, seed = demo_params(spec)
    if demo_is_current(folder, n_volumes, size, seed):
        return folder
    log.info("building demo dataset: %d volumes of %d^3, seed %d, in %s", n_volumes, size, seed, folder)
    return build_demo_dataset(folder, n_volumes, size, seed)
