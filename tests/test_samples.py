"""Sample files: names, NIfTI contents, the PNG grid (size, orientation, windowing) and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from neuromf import atomic
from neuromf.train import sample_files as samples
from neuromf.train.sample_files import epoch_sample_dir, mid_slices, sample_paths, volume_grid, write_sample_set


def sphere(n: int, radius: float = 0.6) -> torch.Tensor:
    """A bright ball in a dark (X, Y, Z) volume with a little noise."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    ball = (sum(a**2 for a in axes) < radius**2).float()
    return ball + 0.02 * torch.randn(n, n, n, generator=torch.Generator().manual_seed(n))


def test_files_and_contents(tmp_path: Path) -> None:
    out = epoch_sample_dir(tmp_path / "run", 10)
    assert out == tmp_path / "run" / "samples" / "epoch_10"
    latents = torch.randn(2, 4, 6, 6, 6)
    volumes = torch.stack([sphere(24)[None], 3 * sphere(24)[None]])
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    paths = write_sample_set(out, latents, volumes, label="ema_nfe1", affine=affine)

    names = {p.name for p in paths.values()}
    assert names == {
        "ema_nfe1_latents.pt",
        "ema_nfe1_grid.png",
        "ema_nfe1_sample_00.nii.gz",
        "ema_nfe1_sample_01.nii.gz",
    }
    assert set(os.listdir(out)) == names  # and nothing else: no temporary files left
    assert paths == sample_paths(out, "ema_nfe1", 2)

    assert torch.equal(torch.load(paths["latents"], weights_only=True), latents)
    image = nib.load(paths["sample_01"])
    assert image.shape == (24, 24, 24)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), volumes[1, 0].numpy())
    np.testing.assert_allclose(image.affine, affine)

    grid = Image.open(paths["grid"])
    assert grid.mode == "L" and grid.width >= 400
    assert np.asarray(grid).std() > 20  # not blank


def test_multichannel_volumes_and_no_volumes(tmp_path: Path) -> None:
    latents = torch.randn(1, 4, 8, 8, 8)
    paths = write_sample_set(tmp_path, latents, latents, label="online_nfe2")
    assert nib.load(paths["sample_00"]).shape == (8, 8, 8, 4)  # channels last, as NIfTI keeps them

    paths = write_sample_set(tmp_path / "lean", latents, latents, label="ema_nfe1", save_volumes=False)
    assert set(paths) == {"latents", "grid"}
    assert sorted(os.listdir(tmp_path / "lean")) == ["ema_nfe1_grid.png", "ema_nfe1_latents.pt"]


def test_grid_size_and_per_volume_window() -> None:
    # Second sample: the same ball, scaled and shifted; per-volume windowing must show it identically.
    volumes = torch.stack([sphere(24)[None], 5 * sphere(24)[None] + 100])
    grid = np.asarray(volume_grid(volumes, header=False))
    factor = -(-samples.MIN_PANEL_PX // 24)  # ceil: 24^3 panels are enlarged to >= MIN_PANEL_PX
    cell, gap = 24 * factor, samples._GAP_PX
    assert grid.shape == (2 * cell + 3 * gap, 3 * cell + 4 * gap)
    row0 = grid[gap : gap + cell].astype(int)
    row1 = grid[2 * gap + cell : 2 * gap + 2 * cell].astype(int)
    assert np.abs(row0 - row1).max() <= 1
    assert row0.max() == 255 and row0.min() == 0  # the window spans the full grey range


def test_one_outlier_does_not_blank_the_picture() -> None:
    volume = sphere(24)
    volume[0, 0, 0] = 1e6  # one hot voxel would squash a min-max window to black
    grid = np.asarray(volume_grid(volume[None, None], header=False))
    centre = grid.shape[0] // 2
    assert grid[centre - 5 : centre + 5, 60:100].mean() > 200  # the ball's middle stays bright


def test_orientation_of_mid_slices() -> None:
    """RAS volume: superior up (sagittal, coronal), anterior up (axial), anterior and right to the right."""
    volume = np.zeros((5, 6, 7), dtype=np.float32)
    volume[2, 5, 6] = 1  # mid-sagittal plane, most anterior, most superior
    volume[4, 3, 5] = 2  # mid-coronal plane, most right, superior
    volume[4, 5, 3] = 3  # mid-axial plane, most right, most anterior
    sagittal, coronal, axial = mid_slices(volume)
    assert sagittal.shape == (7, 6) and coronal.shape == (7, 5) and axial.shape == (6, 5)
    assert sagittal[0, -1] == 1
    assert coronal[1, -1] == 2
    assert axial[0, -1] == 3


def test_nan_volume_still_draws() -> None:
    volume = sphere(16)
    volume[:4] = float("nan")
    grid = np.asarray(volume_grid(volume[None, None]))
    assert grid.std() > 10


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latents = torch.randn(1, 4, 6, 6, 6)
    paths = write_sample_set(tmp_path, latents, latents, label="ema_nfe1")
    before = paths["latents"].read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_sample_set(tmp_path, torch.zeros(1, 4, 6, 6, 6), latents, label="ema_nfe1")
    monkeypatch.undo()
    assert paths["latents"].read_bytes() == before  # the old file is intact
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # and no temporary file remains


def test_bad_label_and_shapes(tmp_path: Path) -> None:
    latents = torch.randn(1, 4, 6, 6, 6)
    with pytest.raises(ValueError, match="label"):
        write_sample_set(tmp_path, latents, latents, label="../escape")
    with pytest.raises(ValueError, match="same B"):
        write_sample_set(tmp_path, latents, torch.randn(2, 1, 6, 6, 6), label="ema_nfe1")
    assert os.listdir(tmp_path) == []
