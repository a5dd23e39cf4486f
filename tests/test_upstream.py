"""The upstream encoder's per-dataset HDF5 shards as sources: pack, metadata, train, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from _latent_data import longitudinal_metas, write_longitudinal, write_upstream_shard
from _tiny_run import tiny_run_raw

from neuromf.cli import main
from neuromf.data.shard import read_shard, read_shard_info

SHAPE16 = (4, 16, 16, 16)


def _upstream_folder(folder: Path, shape: tuple[int, ...] = SHAPE16) -> dict[str, torch.Tensor]:
    """Two upstream shards (one with an unwritten slot) and a few older dict .pt files of a third dataset."""
    oasis = longitudinal_metas({"PT001_OASIS1": 8}, seed=1)
    ixi = longitudinal_metas({"PT005_IXI": 6}, seed=2)
    written = write_upstream_shard(folder / "PT001_OASIS1.h5", oasis, shape, unwritten=(2,), seed=1)
    written |= write_upstream_shard(folder / "PT005_IXI.h5", ixi, shape, seed=2)
    older = longitudinal_metas({"PT002_OASIS2": 3}, seed=3)
    write_longitudinal(folder, older, shape)
    for m in older:
        written[m.name] = torch.load(folder / f"{m.name}.pt", weights_only=True)["z"]
    return written


def test_pack_reads_upstream_shards_and_pt_files_with_their_metadata(tmp_path: Path) -> None:
    written = _upstream_folder(tmp_path / "lat")
    out = tmp_path / "shard.h5"
    assert main(["pack", str(tmp_path / "lat"), str(out), "--no-progress"]) == 0
    x, names = read_shard(out)
    assert names == sorted(written)  # only the written slots; the unwritten one is absent
    for i, name in enumerate(names):
        assert torch.equal(x[i], written[name]), name
    info = read_shard_info(out)
    assert info.metadata_from == "shard" and info.source_count == len(written)
    metas = {m.name: m for m in info.metas}
    oasis = longitudinal_metas({"PT001_OASIS1": 8}, seed=1)
    unwritten = oasis[2].name
    assert unwritten not in metas
    m = metas[oasis[0].name]
    assert (m.subject, m.session, m.dataset, m.source_path) == (
        oasis[0].subject,
        oasis[0].session,
        "PT001_OASIS1",
        oasis[0].source_path,
    )
    older = longitudinal_metas({"PT002_OASIS2": 3}, seed=3)[0]
    assert metas[older.name].dataset == "PT002_OASIS2" and metas[older.name].source_path == older.source_path


def test_pack_then_train_on_upstream_shards(tmp_path: Path) -> None:
    _upstream_folder(tmp_path / "lat")
    run_dir = tmp_path / "run"
    raw = tiny_run_raw(tmp_path / "lat", run_dir, max_steps=3)
    raw["data"].update({"val_fraction": 0.2, "test_fraction": 0.1})
    raw["training"]["batch_size"] = 2
    raw["sampling"].update({"n_samples": 1, "nfe": [1], "weights": ["ema"]})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["pack", str(spec_path), "--no-progress"]) == 0
    assert main(["train", str(spec_path)]) == 0
    split = json.loads((run_dir / "split.json").read_text())
    shard_names = read_shard_info(run_dir / "latents.h5").names
    assert sorted(split["train"] + split["val"] + split["test"]) == shard_names
    assert set(split["by_dataset"]) == {"PT001_OASIS1", "PT002_OASIS2", "PT005_IXI"}


def test_source_folder_of_upstream_shards(tmp_path: Path) -> None:
    """data.source 'folder' reads upstream slots directly (no shard)."""
    from neuromf.data.prepare import prepare_data
    from neuromf.spec import runspec_from_dict

    written = _upstream_folder(tmp_path / "lat")
    raw = tiny_run_raw(tmp_path / "lat", tmp_path / "run", max_steps=3)
    raw["data"] = {"source": "folder", "latent_dir": str(tmp_path / "lat"), "val_fraction": 0.2, "residency": "stream"}
    data = prepare_data(runspec_from_dict(raw, tmp_path), torch.device("cpu"), progress=False)
    assert sorted(data.train_names + data.val_names + data.test_names) == sorted(written)
    batch = next(iter(data.val_batches(1)))
    assert torch.allclose(data.stats.denormalise(batch[0]), written[data.val_names[0]], atol=1e-5)
    data.close()


def _bad(folder: Path, kind: str) -> str:
    metas = longitudinal_metas({"PT001_OASIS1": 3}, seed=1)
    if kind == "no written slots":
        write_upstream_shard(folder / "A.h5", metas, (4, 8, 8, 8), unwritten=tuple(range(len(metas))))
        return "A.h5: no written slots"
    if kind == "mismatched shapes":
        write_upstream_shard(folder / "A.h5", metas, (4, 8, 8, 8))
        write_upstream_shard(folder / "B.h5", longitudinal_metas({"PT005_IXI": 2}), (4, 8, 8, 16))
        return "B.h5: latents of shape [4, 8, 8, 16], but"
    if kind == "missing latents":
        write_upstream_shard(folder / "A.h5", metas, (4, 8, 8, 8), with_latents=False)
        return "A.h5: no 'latents' dataset"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no written slots", "mismatched shapes", "missing latents"])
def test_bad_upstream_shards_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    expected = _bad(tmp_path / "lat", kind)
    out = tmp_path / "out" / "shard.h5"
    assert main(["pack", str(tmp_path / "lat"), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_validate_check_paths_knows_upstream_shards_and_prints_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _upstream_folder(tmp_path / "lat")
    raw = tiny_run_raw(tmp_path / "lat", tmp_path / "run", max_steps=3)
    raw["training"]["batch_size"] = 2
    spec_path = tmp_path / "spec.yaml"
    # data.shard pointing at an upstream shard: not OK (train would fail later)
    raw["data"] = {"source": "shard", "shard": str(tmp_path / "lat" / "PT005_IXI.h5")}
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(spec_path), "--check-paths"]) == 2
    err = capsys.readouterr().err
    assert "data.shard:" in err and "an upstream encoder shard, not a NeuroMF shard" in err and "Traceback" not in err
    # ... and train refuses to pack over it
    raw["data"]["latent_dir"] = str(tmp_path / "lat")
    spec_path.write_text(yaml.safe_dump(raw))
    before = (tmp_path / "lat" / "PT005_IXI.h5").read_bytes()
    assert main(["train", str(spec_path)]) == 2
    assert "refusing to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "lat" / "PT005_IXI.h5").read_bytes() == before
    # the folder itself: OK, and the split is printed per split with subjects and datasets
    raw["data"] = {
        "source": "shard",
        "latent_dir": str(tmp_path / "lat"),
        "shard": str(tmp_path / "run" / "l.h5"),
        "val_fraction": 0.2,
        "test_fraction": 0.1,
    }
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(spec_path), "--check-paths"]) == 0
    out = capsys.readouterr().out
    assert "split by subject" in out
    for which in ("train", "val", "test"):
        assert f"    {which}: " in out and "subjects" in out and "datasets" in out


def test_old_shard_without_metadata_still_loads(tmp_path: Path) -> None:
    """A version-1 shard (no metadata datasets): subjects parsed from the names."""
    from neuromf.data.meta import parsed_meta

    metas = longitudinal_metas({"PT005_IXI": 4}, seed=4)
    write_longitudinal(tmp_path / "lat", metas, (4, 8, 8, 8), with_metadata=False)
    out = tmp_path / "s.h5"
    assert main(["pack", str(tmp_path / "lat"), str(out), "--no-progress"]) == 0
    with h5py.File(out, "r+") as f:
        for key in ("subject", "session", "dataset", "source_path"):
            del f[key]
        f.attrs["format_version"] = 1
    info = read_shard_info(out)
    assert info.metadata_from == "names"
    assert [(m.subject, m.dataset) for m in info.metas] == [(parsed_meta(n).subject, "PT005_IXI") for n in info.names]
    assert all(m.subject.startswith("sub_") for m in info.metas)
    assert np.all(np.isfinite(info.mean))
