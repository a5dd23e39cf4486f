"""The embedded demo dataset: real MNI152 anatomy, right format, deterministic, atomic, rebuilt only when stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from neuromf.cli import main
from neuromf.data import demo
from neuromf.data.demo import build_demo_dataset, demo_brain_mask, ensure_demo_dataset
from neuromf.spec import load_runspec

REPO = Path(__file__).resolve().parents[1]
N, SIZE, SEED = 6, 24, 7


def load_set(folder: Path) -> torch.Tensor:
    """All volumes of a demo set, in name order: (n, 4, S, S, S)."""
    return torch.stack([torch.load(p, weights_only=True) for p in sorted(folder.glob("demo_*.pt"))])


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "set", N, SIZE, SEED)


def test_files_shapes_dtype_finite(demo_set: Path) -> None:
    names = sorted(p.name for p in demo_set.iterdir())
    assert names == [f"demo_{i:04d}.pt" for i in range(N)] + ["latent_stats.json"]
    # Nothing left beside it by the temporary build folder.
    assert [p.name for p in demo_set.parent.iterdir()] == ["set"]
    for path in sorted(demo_set.glob("*.pt")):
        volume = torch.load(path, weights_only=True)
        assert isinstance(volume, torch.Tensor)
        assert volume.shape == (4, SIZE, SIZE, SIZE) and volume.dtype == torch.float32
        assert torch.isfinite(volume).all()
        assert volume.std() > 0.05  # not blank


def test_stats_file_matches_the_data(demo_set: Path) -> None:
    info = json.loads((demo_set / "latent_stats.json").read_text())
    data = load_set(demo_set).double()
    assert set(info["per_channel"]) == {f"channel_{c}" for c in range(4)}
    for c in range(4):
        values = data[:, c]
        stats = info["per_channel"][f"channel_{c}"]
        assert stats["mean"] == pytest.approx(values.mean().item(), rel=1e-9, abs=1e-12)
        assert stats["std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-9)
        assert stats["std"] > 0
    assert (info["n_volumes"], info["size"], info["seed"]) == (N, SIZE, SEED)


def test_deterministic_for_a_seed_and_different_for_another(demo_set: Path, tmp_path: Path) -> None:
    again = load_set(build_demo_dataset(tmp_path / "again", N, SIZE, SEED))
    assert torch.equal(again, load_set(demo_set))
    other = load_set(build_demo_dataset(tmp_path / "other", N, SIZE, SEED + 1))
    assert (other - again).abs().mean() > 0.02
    # Volume i does not depend on how many volumes the set has.
    prefix = load_set(build_demo_dataset(tmp_path / "prefix", 2, SIZE, SEED))
    assert torch.equal(prefix, again[:2])


def test_volumes_are_brains_and_differ_from_each_other(demo_set: Path) -> None:
    data = load_set(demo_set)
    mask = torch.from_numpy(demo_brain_mask(SIZE))
    assert 0.2 < mask.float().mean() < 0.7  # the brain fills much of the cube, not all of it
    far = torch.from_numpy(~binary_dilation(mask.numpy(), iterations=3))
    for volume in data:
        t1 = volume[0]
        inside, outside = t1[mask].mean().item(), t1[~mask].abs().mean().item()
        assert inside > 0.4 and inside > 5 * outside, (inside, outside)
        # Tissue maps sit inside the brain too: well above the level and spread of the background away
        # from the brain's edge (which the random warp moves by a voxel or two).
        for c in (1, 2, 3):
            background = volume[c][far]
            assert volume[c][mask].mean() - background.mean() > 3 * background.std()
    # Random warps and intensities: related (same anatomy) but not copies.
    a, b = data[0, 0].flatten(), data[1, 0].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert 0.6 < corr < 0.995, corr
    assert (data[0] - data[1]).abs().mean() > 0.02


def test_cli_writes_a_set_and_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli_set"
    assert main(["demo-data", str(out), "--n", "4", "--size", "16", "--seed", "3"]) == 0
    assert "wrote 4 demo volumes" in capsys.readouterr().out
    first = load_set(out)
    assert first.shape == (4, 4, 16, 16, 16)
    # A demo set may be replaced by another one.
    assert main(["demo-data", str(out), "--n", "3", "--size", "16", "--seed", "4"]) == 0
    assert load_set(out).shape[0] == 3 and not torch.equal(load_set(out), first[:3])

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo-data", str(foreign), "--n", "4", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "not a demo dataset" in err and "Traceback" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main(["demo-data", str(foreign / "notes.txt")]) == 2
    assert main(["demo-data", str(tmp_path / "x"), "--size", "4"]) == 2
    assert "--size" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "set"
    real = demo.make_demo_volume

    def fails_at_the_third(size: int, seed: int, index: int) -> torch.Tensor:
        if index == 2:
            raise KeyboardInterrupt
        return real(size, seed, index)

    monkeypatch.setattr(demo, "make_demo_volume", fails_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(out, 4, 16, 0)
    assert list(tmp_path.iterdir()) == []

    # An interrupted rebuild keeps the old, complete set.
    monkeypatch.setattr(demo, "make_demo_volume", real)
    build_demo_dataset(out, 4, 16, 0)
    before = load_set(out)
    monkeypatch.setattr(demo, "make_demo_volume", fails_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(out, 4, 16, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
    assert torch.equal(load_set(out), before)


def test_ensure_builds_once_and_rebuilds_when_parameters_change(tmp_path: Path) -> None:
    def spec(*overrides: str):
        base = [f"paths.run_dir={tmp_path / 'run'}", "model.spatial_size=[16,16,16]", "data.demo.size=16"]
        base.append("data.demo.n_volumes=4")
        return load_runspec(REPO / "runspecs" / "demo.yaml", base + list(overrides))

    folder = ensure_demo_dataset(spec())
    assert folder == tmp_path / "run" / "data" / "demo"
    info = json.loads((folder / "latent_stats.json").read_text())
    assert (info["n_volumes"], info["size"], info["seed"]) == (4, 16, 0)
    stamp = (folder / "demo_0000.pt").stat().st_mtime_ns, (folder / "latent_stats.json").stat().st_ino

    assert ensure_demo_dataset(spec()) == folder  # same parameters: untouched
    assert ((folder / "demo_0000.pt").stat().st_mtime_ns, (folder / "latent_stats.json").stat().st_ino) == stamp

    first = load_set(folder)
    ensure_demo_dataset(spec("data.demo.seed=5"))  # another seed: rebuilt
    assert json.loads((folder / "latent_stats.json").read_text())["seed"] == 5
    assert not torch.equal(load_set(folder), first)

    ensure_demo_dataset(spec("data.demo.seed=5", "data.demo.n_volumes=5"))  # another count: rebuilt
    assert len(list(folder.glob("demo_*.pt"))) == 5

    # A missing volume makes the set incomplete: rebuilt.
    (folder / "demo_0003.pt").unlink()
    ensure_demo_dataset(spec("data.demo.seed=5", "data.demo.n_volumes=5"))
    assert (folder / "demo_0003.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == ["demo"]


def test_brain_mask_is_the_templates() -> None:
    # The mask comes from the nilearn template itself: the same voxels, cropped and resampled.
    mask = demo_brain_mask(32)
    assert mask.shape == (32, 32, 32) and mask.dtype == np.bool_
    assert not mask[0].any() and not mask[-1].any()  # a margin around the brain (left/right)
    assert mask[16].any(axis=1).sum() > 20  # the brain spans most of the cube front to back
