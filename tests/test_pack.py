"""`neuromf pack`: round trip, attributes, checksums, bad inputs, --skip-bad, staleness, interrupted packs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _latent_data import SHAPE, make_latent, numpy_stats, write_latents, write_stats_json
from test_latents import _bad_files

from neuromf.cli import main
from neuromf.data.pack import pack_latents
from neuromf.data.shard import content_checksum, read_shard, read_shard_info, shard_freshness
from neuromf.errors import UserError
from neuromf.spec.schema import MAISI_SCALE_FACTOR

REPO = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".h5", ".tmp"))


def test_round_trip_is_bit_identical_with_numpy_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "latents"
    tensors = write_latents(src, 7)
    torch.save({"z": make_latent(50).unsqueeze(0)}, src / "extra.pt")  # dict + (1, C, D, H, W) form
    tensors["extra"] = make_latent(50)
    out = tmp_path / "shard" / "latents.h5"
    assert main(["pack", str(src), str(out), "--no-progress"]) == 0
    assert "packed 8 latents of shape [4, 16, 16, 16] (float32)" in capsys.readouterr().out

    x, names = read_shard(out)
    assert names == sorted(tensors)
    for i, name in enumerate(names):
        assert torch.equal(x[i], tensors[name]), name
    info = read_shard_info(out)
    ref = numpy_stats([tensors[n] for n in names])
    np.testing.assert_allclose(info.mean, ref["mean"], rtol=1e-12)
    np.testing.assert_allclose(info.std, ref["std"], rtol=1e-12)
    np.testing.assert_array_equal(info.min, ref["min"])
    np.testing.assert_array_equal(info.max, ref["max"])
    assert (info.n, info.shape, info.dtype, info.source_count) == (8, SHAPE, "float32", 8)
    assert info.scale_factor == MAISI_SCALE_FACTOR and info.skipped == []
    with h5py.File(out, "r") as f:
        assert f["latents"].chunks == (1, *SHAPE)  # one sample per chunk
        assert f["latents"].dtype == np.float32 and f.attrs["channel_mean"].dtype == np.float64
    assert _leftovers(out.parent) == ["latents.h5"]


def test_packing_twice_gives_the_same_content_checksum(tmp_path: Path) -> None:
    src = tmp_path / "latents"
    write_latents(src, 5)
    a = pack_latents(src, tmp_path / "a.h5", progress=False).info
    b = pack_latents(src, tmp_path / "b.h5", progress=False).info
    assert a.content_sha256 == b.content_sha256 == content_checksum(tmp_path / "a.h5")
    assert a.source_sha256 == b.source_sha256
    torch.save(make_latent(99), src / "sub-002.pt")  # one changed file changes both checksums
    c = pack_latents(src, tmp_path / "c.h5", progress=False).info
    assert c.content_sha256 != a.content_sha256 and c.source_sha256 != a.source_sha256


@pytest.mark.parametrize(
    "dtype, torch_dtype, max_rel", [("float16", torch.float16, 2**-11), ("bfloat16", torch.bfloat16, 2**-8)]
)
def test_half_precision_packs(tmp_path: Path, dtype: str, torch_dtype: torch.dtype, max_rel: float) -> None:
    src = tmp_path / "latents"
    tensors = write_latents(src, 4)
    full = pack_latents(src, tmp_path / "f32.h5", progress=False)
    half = pack_latents(src, tmp_path / f"{dtype}.h5", dtype=dtype, progress=False)
    x, names = read_shard(tmp_path / f"{dtype}.h5")
    assert x.dtype == torch_dtype and half.info.dtype == dtype
    for i, name in enumerate(names):
        assert torch.equal(x[i], tensors[name].to(torch_dtype))  # exactly the rounded values
        rel = ((x[i].float() - tensors[name]).abs() / tensors[name].abs().clamp_min(1e-3)).max()
        assert rel <= max_rel * 1.0001
    assert half.nbytes < 0.6 * full.nbytes
    np.testing.assert_array_equal(half.info.mean, full.info.mean)  # stats are over the source values
    assert content_checksum(tmp_path / f"{dtype}.h5") == half.info.content_sha256


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    torch.save(make_latent(0) * 1e5, tmp_path / "big.pt")
    with pytest.raises(UserError, match="overflow float16"):
        pack_latents(tmp_path, tmp_path / "out.h5", dtype="float16", progress=False)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    "bad, words",
    [
        ("truncated", "unreadable or truncated"),
        ("empty", "unreadable or truncated"),
        ("object", "safe loading (weights_only) refused it"),
        ("list", "holds a list, not a tensor"),
        ("dictkey", "a dict without any of the keys"),
        ("rank3", "has rank 3"),
        ("int", "dtype int16 is not floating point"),
        ("nan", "1 NaN and 0 Inf values"),
        ("inf", "0 NaN and 1 Inf values"),
        ("shape", "differs from [4, 16, 16, 16]"),
    ],
)
def test_each_bad_input_fails_with_its_error_and_no_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, words: str
) -> None:
    src, scratch = tmp_path / "latents", tmp_path / "scratch"
    write_latents(src, 3)
    if bad == "shape":
        torch.save(make_latent(7, (4, 16, 16, 8)), src / "shape.pt")
    else:
        scratch.mkdir()
        _bad_files(scratch)
        (src / f"{bad}.pt").write_bytes((scratch / f"{bad}.pt").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    assert main(["pack", str(src), str(out / "latents.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{src / bad}.pt: ") and words in err[0], err
    assert "1 of 4 latents are bad" in err[-1]
    assert _leftovers(out) == []


def test_empty_and_missing_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(tmp_path), str(tmp_path / "out.h5")]) == 2
    assert "no .pt files" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "nope"), str(tmp_path / "out.h5")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_unwritable_output_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_latents(tmp_path / "lat", 2)
    (tmp_path / "file").write_text("not a folder")
    assert main(["pack", str(tmp_path / "lat"), str(tmp_path / "file" / "out.h5")]) == 2
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "lat"), str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_bad_input_exits_2_in_a_real_process(tmp_path: Path) -> None:
    src = tmp_path / "latents"
    write_latents(src, 2)
    torch.save(make_latent(0).to(torch.int32), src / "ints.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "neuromf", "pack", str(src), str(tmp_path / "o.h5")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{src / 'ints.pt'}: dtype int32 is not floating point" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.h5").exists()


def test_skip_bad_packs_the_good_and_reports_exactly_the_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "latents"
    src.mkdir()
    expected = _bad_files(src)
    good = write_latents(src, 3)
    torch.save(make_latent(7, (4, 8, 16, 16)), src / "odd-shape.pt")
    out = tmp_path / "out.h5"
    assert main(["pack", str(src), str(out), "--skip-bad", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    bad = set(expected) | {"odd-shape"}
    assert f"skipped {len(bad)} of {len(bad) + 4} files" in stdout
    table = stdout.split("\n", 1)[1].split("\npacked", 1)[0].splitlines()[2:]  # rows after header and rule
    assert {row.split()[0] for row in table} == {f"{name}.pt" for name in bad}
    info = read_shard_info(out)
    assert info.names == ["ok", *sorted(good)] and {name for name, _ in info.skipped} == bad
    assert info.source_count == len(bad) + 4


def test_all_bad_with_skip_bad_still_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save([1, 2], tmp_path / "a.pt")
    assert main(["pack", str(tmp_path), str(tmp_path / "o.h5"), "--skip-bad"]) == 2
    assert "a.pt: holds a list" in capsys.readouterr().err and not (tmp_path / "o.h5").exists()


def test_stats_file_disagreement_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "latents"
    tensors = write_latents(src, 3)
    ref = numpy_stats(list(tensors.values()))
    write_stats_json(src, ref["mean"], ref["std"])
    assert main(["pack", str(src), str(tmp_path / "a.h5"), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    write_stats_json(src, ref["mean"], ref["std"] * 1.5)
    assert main(["pack", str(src), str(tmp_path / "b.h5"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 4 and "latent_stats.json disagrees" in err


def test_pack_from_a_run_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_latents(tmp_path / "lat", 3)
    spec = tmp_path / "run.yaml"
    spec.write_text("data: {source: shard, latent_dir: lat}\npaths: {run_dir: runs/x}\nvae: {decoder: identity}\n")
    assert main(["pack", str(spec), "--no-progress"]) == 0
    assert read_shard_info(tmp_path / "runs/x/data/latents.h5").n == 3
    assert main(["pack", str(spec), "--set", "data.shard=elsewhere.h5", "--dtype", "bfloat16", "--no-progress"]) == 0
    assert read_shard_info(tmp_path / "elsewhere.h5").dtype == "bfloat16"
    capsys.readouterr()
    assert main(["pack", str(spec), str(tmp_path / "x.h5")]) == 2
    assert "give either SPEC or SRC_DIR OUT.h5" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "lat")]) == 2
    assert "give the shard to write too" in capsys.readouterr().err


def test_staleness_is_detected(tmp_path: Path) -> None:
    src = tmp_path / "latents"
    write_latents(src, 3)
    out = tmp_path / "s.h5"
    assert shard_freshness(out, src) == (False, "it does not exist yet")
    pack_latents(src, out, progress=False)
    assert shard_freshness(out, src) == (True, "up to date")
    os.utime(src / "sub-001.pt", ns=(1, 1))  # touched, same bytes: still fresh (by content)
    assert shard_freshness(out, src) == (True, "up to date (same file contents)")
    torch.save(make_latent(42), src / "sub-001.pt")
    assert shard_freshness(out, src)[0] is False
    write_latents(src, 1, start=3)
    assert "changed since it was packed" in shard_freshness(out, src)[1]
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    assert shard_freshness(out, src) == (False, f"{out}: incomplete shard (its packing was interrupted); pack it again")


# Packs slowly (a sleep per written sample) so the test can kill it mid-write.
SLOW_PACK = """
import sys, time
import neuromf.data.pack as shard
real = shard.load_latent_bytes
def slow(data, path):
    time.sleep(0.15)
    return real(data, path)
shard.load_latent_bytes = slow
from neuromf.cli import main
sys.exit(main(["pack", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_killed_pack_leaves_no_valid_looking_shard(tmp_path: Path) -> None:
    src = tmp_path / "latents"
    write_latents(src, 40)
    out = tmp_path / "out" / "latents.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PACK, str(src), str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(out.parent.glob(".latents.h5.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(1.0)  # a few samples into the file
        assert proc.poll() is None, "pack finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    temps = list(out.parent.glob(".latents.h5.*.tmp"))
    assert not out.exists() and len(temps) == 1
    with pytest.raises(UserError, match="incomplete shard|not a readable HDF5 file"):
        read_shard_info(temps[0])
    assert shard_freshness(out, src)[0] is False
    pack_latents(src, out, progress=False)  # a new pack works and clears the dead one's temporary
    assert read_shard_info(out).n == 40 and _leftovers(out.parent) == ["latents.h5"]
