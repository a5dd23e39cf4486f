"""Reading .pt latents safely, their checks, float64 statistics and latent_stats.json."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _latent_data import SHAPE, make_latent, numpy_stats, write_latents, write_stats_json

from neuromf.data.latents import (
    ChannelStats,
    LatentFileError,
    check_stats_file,
    compare_stats,
    read_latent,
    read_stats_json,
)
from neuromf.data.scan import scan_latents
from neuromf.data.sources import list_latent_files
from neuromf.data.stats import LatentStats
from neuromf.errors import UserError


class NotALatent:
    """A class torch.load(weights_only=True) must refuse to unpickle."""

    def __init__(self) -> None:
        self.z = torch.zeros(3)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda x: x,
        lambda x: x.unsqueeze(0),
        lambda x: {"z": x, "meta": "subject 1"},
        lambda x: {"latent": x.unsqueeze(0)},
        lambda x: {"latents": x},
    ],
    ids=["CDHW", "1CDHW", "dict-z", "dict-latent-5d", "dict-latents"],
)
def test_accepted_forms_read_back_exactly(tmp_path: Path, wrap) -> None:
    x = make_latent(1)
    torch.save(wrap(x), tmp_path / "a.pt")
    y = read_latent(tmp_path / "a.pt")
    assert y.shape == SHAPE and y.dtype == torch.float32 and torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    x = make_latent(2).to(dtype)
    torch.save(x, tmp_path / "a.pt")
    y = read_latent(tmp_path / "a.pt")
    assert y.dtype == dtype and torch.equal(x, y)


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file per way a latent can be wrong; name -> words its error must contain."""
    good = make_latent(0)
    torch.save(good, folder / "ok.pt")
    data = (folder / "ok.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "garbage.pt").write_bytes(b"this is not a torch file at all")
    torch.save(NotALatent(), folder / "object.pt")
    with open(folder / "numpy.pt", "wb") as f:
        pickle.dump(np.zeros(3), f)
    torch.save([good], folder / "list.pt")
    torch.save({"image": good}, folder / "dictkey.pt")
    torch.save(good[0], folder / "rank3.pt")
    torch.save(torch.stack([good, good]), folder / "batch2.pt")
    torch.save(good.to(torch.int16), folder / "int.pt")
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    torch.save(nan, folder / "nan.pt")
    inf = good.clone()
    inf[1, 0, 0, 0] = float("inf")
    torch.save(inf, folder / "inf.pt")
    return {
        "truncated": "truncated",
        "empty": "truncated",
        "garbage": "truncated",
        "object": "weights_only",
        "numpy": "weights_only",
        "list": "holds a list",
        "dictkey": "without any of the keys",
        "rank3": "rank 3",
        "batch2": "rank 5",
        "int": "not floating point",
        "nan": "1 NaN and 0 Inf",
        "inf": "0 NaN and 1 Inf",
    }


def test_every_bad_file_names_itself_and_its_problem(tmp_path: Path) -> None:
    expected = _bad_files(tmp_path)
    for name, words in expected.items():
        path = tmp_path / f"{name}.pt"
        with pytest.raises(LatentFileError) as err:
            read_latent(path)
        assert err.value.path == path
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
        assert words in err.value.reason, (name, err.value.reason)


def test_scan_lists_bad_files_and_the_odd_shape(tmp_path: Path) -> None:
    expected = _bad_files(tmp_path)
    write_latents(tmp_path, 3)
    torch.save(make_latent(9, (4, 16, 16, 8)), tmp_path / "small.pt")
    scan = scan_latents(tmp_path, progress=False)
    reasons = {p.stem: r for p, r in scan.bad}
    assert set(reasons) == set(expected) | {"small"}
    assert "differs from [4, 16, 16, 16]" in reasons["small"]
    assert [item.name for item in scan.good] == ["ok", "sub-000", "sub-001", "sub-002"]
    assert scan.shape == SHAPE and len(scan.file_hashes) == len(scan.files) == len(expected) + 5


def test_folder_problems(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        list_latent_files(tmp_path / "missing")
    with pytest.raises(UserError, match="no .pt files"):
        list_latent_files(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no .pt files"):
        list_latent_files(tmp_path)


def test_channel_stats_merge_equals_numpy() -> None:
    xs = [make_latent(i) for i in range(5)] + [make_latent(7).double() * 1e3]
    merged = ChannelStats.of(xs[0])
    for x in xs[1:]:
        merged = merged.merge(ChannelStats.of(x))
    ref = numpy_stats(xs)
    np.testing.assert_allclose(merged.mean, ref["mean"], rtol=1e-12)
    np.testing.assert_allclose(merged.std, ref["std"], rtol=1e-12)
    np.testing.assert_array_equal(merged.min, ref["min"])
    np.testing.assert_array_equal(merged.max, ref["max"])


def test_stats_json_reading_and_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_stats_json(tmp_path, [0.1, 0.2], [1.0, 2.0])
    mean, std = read_stats_json(path)
    assert mean.tolist() == [0.1, 0.2] and std.tolist() == [1.0, 2.0]
    assert compare_stats(mean, std, np.array([0.1, 0.2]), np.array([1.0, 2.0])) == []
    assert len(compare_stats(mean, std, np.array([0.1, 0.5]), np.array([1.0, 2.0]))) == 1
    assert "channels" in compare_stats(mean, std, np.zeros(3), np.ones(3))[0]

    x = make_latent(3)[:2]
    stats = ChannelStats.of(x)
    write_stats_json(tmp_path, stats.mean, stats.std)
    assert check_stats_file(path, stats) == [] and capsys.readouterr().err == ""
    write_stats_json(tmp_path, stats.mean + 1.0, stats.std)
    assert len(check_stats_file(path, stats)) == 2
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "channel_0" in err and "latent_stats.json" in err

    for text, words in [
        ("{", "cannot read"),
        ('{"per_channel": {}}', "per_channel"),
        ('{"per_channel": {"channel_1": {"mean": 0, "std": 1}}}', "no channel_0"),
        ('{"per_channel": {"channel_0": {"mean": 0}}}', "numeric 'mean' and 'std'"),
        ('{"per_channel": {"channel_0": {"mean": 0, "std": 0}}}', "must be finite and > 0"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=words):
            read_stats_json(path)


def test_latent_stats_normalise_round_trip(tmp_path: Path) -> None:
    x = torch.stack([make_latent(i) for i in range(3)])
    stats = LatentStats([-1.5, -0.5, 0.5, 1.5], [0.5, 0.75, 1.0, 1.25])
    z = stats.normalise(x)
    expected = (x - stats.mean.view(4, 1, 1, 1)) / stats.std.view(4, 1, 1, 1)
    assert torch.equal(z, expected)
    assert torch.allclose(stats.denormalise(z), x, atol=1e-5)
    assert torch.allclose(stats.normalise(x[0]), z[0])  # unbatched too
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    again = LatentStats.from_json(write_stats_json(tmp_path, stats.mean.tolist(), stats.std.tolist()))
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.std, stats.std)
    assert torch.equal(LatentStats.from_state_dict(stats.state_dict()).std, stats.std)
    with pytest.raises(ValueError, match="expected"):
        stats.normalise(torch.zeros(2, 3, 4, 4, 4))
    with pytest.raises(UserError, match="std 0"):
        LatentStats([0.0, 0.0], [1.0, 0.0])
