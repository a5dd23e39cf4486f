"""Sample files: raw latents, decoded volumes (NIfTI) and one PNG grid of mid slices per sample set.

Layout (the trainer writes one set per weights/NFE combination per sampling epoch):

    <run_dir>/samples/epoch_<N>/
        <label>_latents.pt          the de-normalised latents, float32 tensor (B, C, D, H, W)
        <label>_grid.png            rows = samples, columns = mid-sagittal, mid-coronal, mid-axial
        <label>_sample_00.nii.gz    one decoded volume per sample (float32; (X, Y, Z), or (X, Y, Z, C) if C > 1)
        ...

`label` names the set, e.g. "ema_nfe1" (EMA weights, one step) or "online_nfe2".
Every file appears whole or not at all: written to a hidden temporary name in
the same folder, flushed, fsynced and renamed.

Grid orientation assumes RAS voxel order (the MNI152/MAISI convention): the
sagittal panel has anterior to the right, the coronal and axial panels show
the patient's right on the image right (neurological convention); superior is
up in sagittal and coronal, anterior is up in axial. Each volume's first
channel is windowed to its own 1st-99th percentile.
"""

from __future__ import annotations

import gzip
import io
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from neuromf.atomic import atomic_write_bytes

SLICE_NAMES = ("sagittal", "coronal", "axial")
# Small volumes (the 24^3 demo) are enlarged so a panel is at least this many pixels.
MIN_PANEL_PX = 160
_GAP_PX = 2
_HEADER_PX = 16
_GAP_GREY = 40
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def epoch_sample_dir(run_dir: Path, epoch: int) -> Path:
    """`<run_dir>/samples/epoch_<epoch>`: where the trainer writes the sample sets of one epoch."""
    return Path(run_dir) / "samples" / f"epoch_{epoch}"


def sample_paths(out_dir: Path, label: str, n_samples: int, *, save_volumes: bool = True) -> dict[str, Path]:
    """The files `write_sample_set` writes: keys "latents", "grid" and "sample_00", "sample_01", ..."""
    if not _LABEL_RE.match(label):
        raise ValueError(f"label {label!r}: use letters, digits, '_', '-' and '.' only (it becomes a file name)")
    out_dir = Path(out_dir)
    paths = {"latents": out_dir / f"{label}_latents.pt", "grid": out_dir / f"{label}_grid.png"}
    if save_volumes:
        width = max(2, len(str(n_samples - 1)))
        for i in range(n_samples):
            paths[f"sample_{i:0{width}d}"] = out_dir / f"{label}_sample_{i:0{width}d}.nii.gz"
    return paths


def mid_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-sagittal, mid-coronal and mid-axial slices of a (X, Y, Z) array, oriented for display.

    Each returned array is (rows, cols) with row 0 at the top of the picture:
    transposing a plane and flipping its rows puts the last axis (superior, or
    anterior for axial) at the top and keeps the first axis left-to-right.
    """
    x, y, z = (s // 2 for s in volume.shape)
    planes = (volume[x, :, :], volume[:, y, :], volume[:, :, z])
    return tuple(np.ascontiguousarray(p.T[::-1]) for p in planes)  # type: ignore[return-value]


def _window(volume: np.ndarray) -> np.ndarray:
    """uint8 image of `volume` windowed to its 1st-99th percentile (NaN/Inf shown black)."""
    finite = np.isfinite(volume)
    if not finite.any():
        return np.zeros(volume.shape, dtype=np.uint8)
    lo, hi = np.percentile(volume[finite], [1.0, 99.0])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((np.where(finite, volume, lo) - lo) * scale, 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def volume_grid(
    volumes: Tensor,
    *,
    min_panel_px: int = MIN_PANEL_PX,
    resample: Literal["nearest", "bilinear"] = "nearest",
    header: bool = True,
) -> Image.Image:
    """A greyscale ("L") PIL image: one row per sample, columns mid-sagittal, mid-coronal, mid-axial.

    `volumes` is (B, C, X, Y, Z); only channel 0 is shown, windowed per volume
    to its 1st-99th percentile. Panels are enlarged by a whole factor until the
    largest side reaches `min_panel_px` (nearest keeps the voxels visible) and
    centred in square cells; a header names the columns.
    """
    if volumes.dim() != 5:
        raise ValueError(f"volumes must be (B, C, X, Y, Z), got shape {tuple(volumes.shape)}")
    n = volumes.shape[0]
    side = max(volumes.shape[2:])
    factor = max(1, math.ceil(min_panel_px / side))
    cell = side * factor
    top = _HEADER_PX if header else 0
    width = 3 * cell + 4 * _GAP_PX
    height = top + n * cell + (n + 1) * _GAP_PX
    canvas = Image.new("L", (width, height), color=_GAP_GREY)
    method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BILINEAR
    data = volumes[:, 0].detach().to(device="cpu", dtype=torch.float32).numpy()
    for row in range(n):
        windowed = _window(data[row])
        for col, plane in enumerate(mid_slices(windowed)):
            panel = Image.fromarray(plane, mode="L")
            panel = panel.resize((plane.shape[1] * factor, plane.shape[0] * factor), resample=method)
            cell_img = Image.new("L", (cell, cell), color=0)
            cell_img.paste(panel, ((cell - panel.width) // 2, (cell - panel.height) // 2))
            canvas.paste(cell_img, (_GAP_PX + col * (cell + _GAP_PX), top + _GAP_PX + row * (cell + _GAP_PX)))
    if header:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for col, name in enumerate(SLICE_NAMES):
            draw.text((_GAP_PX + col * (cell + _GAP_PX) + 3, 2), name, fill=255, font=font)
    return canvas


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped single-file NIfTI-1 of a (C, X, Y, Z) float array."""
    import nibabel as nib

    data = volume[0] if volume.shape[0] == 1 else np.moveaxis(volume, 0, -1)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    # Level 1: decoded float volumes barely compress better at higher levels but take several times longer.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def write_sample_set(
    out_dir: Path,
    latents: Tensor,
    volumes: Tensor,
    *,
    label: str,
    save_volumes: bool = True,
    affine: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write one sample set into `out_dir` (created if needed); returns `sample_paths(...)`'s dict.

    `latents` (B, C, D, H, W) are saved as given (float32, CPU); `volumes`
    (B, C', X, Y, Z) are the decoded volumes: one NIfTI per sample when
    `save_volumes`, and the PNG grid of their mid slices. `affine` is the
    NIfTI voxel-to-world matrix (default: identity, 1 mm voxels).
    """
    if latents.dim() != 5 or volumes.dim() != 5 or latents.shape[0] != volumes.shape[0]:
        raise ValueError(
            f"expected latents (B, C, D, H, W) and volumes (B, C, X, Y, Z) with the same B, "
            f"got {tuple(latents.shape)} and {tuple(volumes.shape)}"
        )
    matrix = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {matrix.shape}")
    out_dir = Path(out_dir)
    paths = sample_paths(out_dir, label, latents.shape[0], save_volumes=save_volumes)
    out_dir.mkdir(parents=True, exist_ok=True)

    buffer = io.BytesIO()
    # clone(): torch.save of a view would store the whole underlying storage.
    torch.save(latents.detach().to(device="cpu", dtype=torch.float32).contiguous().clone(), buffer)
    atomic_write_bytes(paths["latents"], buffer.getvalue())

    buffer = io.BytesIO()
    volume_grid(volumes).save(buffer, format="PNG")
    atomic_write_bytes(paths["grid"], buffer.getvalue())

    if save_volumes:
        data = volumes.detach().to(device="cpu", dtype=torch.float32).numpy()
        sample_keys = [k for k in paths if k.startswith("sample_")]
        for i, key in enumerate(sample_keys):
            atomic_write_bytes(paths[key], nifti_bytes(data[i], matrix))
    return paths
