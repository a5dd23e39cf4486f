"""What a run checks about its data: latent_stats.json, split.json on resume, the shard's checksum, absurd values,
a full disk while packing, and broken entries in a latent folder. Each bad case: one line, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from _latent_data import longitudinal_metas, make_latent, numpy_stats, write_latents, write_longitudinal
from _tiny_run import tiny_run_raw

from neuromf.cli import main
from neuromf.data.record import VERIFIED_FILE

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 16, 16, 16)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("verifying ")]
    assert len(err) == 1 and "Traceback" not in err[0], err  # the one error line (after the checksum's progress line)
    return err[0]


def _spec(tmp_path: Path, lat: Path, **data: Any) -> Path:
    raw = tiny_run_raw(lat, tmp_path / "run", max_steps=3)
    raw["training"]["batch_size"] = 2
    raw["data"].update({"val_fraction": 0.2, "test_fraction": 0.1, **data})
    raw["sampling"].update({"n_samples": 1, "nfe": [1], "weights": ["ema"], "every_n_epochs": 100})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def lat(tmp_path: Path) -> Path:
    folder = tmp_path / "lat"
    write_longitudinal(folder, longitudinal_metas({"PT001_OASIS1": 8, "PT005_IXI": 6}, seed=1), SHAPE)
    return folder


def _stats_file(lat: Path, std_factor: float = 1.0) -> dict[str, Any]:
    tensors = [torch.load(p, weights_only=True)["z"] for p in sorted(lat.glob("*.pt"))]
    s = numpy_stats(tensors)
    per = {
        f"channel_{c}": {
            "mean": float(s["mean"][c]),
            "std": float(s["std"][c]) * (std_factor if c == 1 else 1.0),
            "min": float(s["min"][c]),
            "max": float(s["max"][c]),
        }
        for c in range(4)
    }
    raw = {"n_files": len(tensors), "per_channel": per}
    (lat / "latent_stats.json").write_text(json.dumps(raw))
    return raw


# ---------------------------------------------------------------- latent_stats.json


def test_stale_stats_file_warns_once_in_train_and_refuses_with_stats_file(
    tmp_path: Path, lat: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _stats_file(lat)  # agrees: no warning
    assert main(["train", str(_spec(tmp_path, lat)), "--dry-run"]) == 0
    assert "disagrees" not in capsys.readouterr().err
    _stats_file(lat, std_factor=1.25)  # channel 1's std 25 % off
    assert main(["train", str(_spec(tmp_path, lat)), "--dry-run"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "disagrees" in line]
    assert len(warnings) == 1 and "channel_1 std" in warnings[0] and "tolerance 2 %" in warnings[0], warnings
    assert main(["train", str(_spec(tmp_path, lat, stats="file")), "--dry-run"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "channel_1 std" in line and "beyond 10 %" in line and "stats_mismatch" in line
    assert main(["train", str(_spec(tmp_path, lat, stats="file", stats_mismatch="warn")), "--dry-run"]) == 0
    _stats_file(lat, std_factor=1.05)  # 5 %: warned, not refused
    assert main(["train", str(_spec(tmp_path, lat, stats="file")), "--dry-run"]) == 0
    assert "channel_1 std" in capsys.readouterr().err


# ---------------------------------------------------------------- split.json


def test_split_json_written_and_a_changed_split_refuses_resume(
    tmp_path: Path, lat: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(tmp_path, lat)
    assert main(["train", str(spec)]) == 0
    record_path = tmp_path / "run" / "split.json"
    record = json.loads(record_path.read_text())
    assert set(record) >= {"train", "val", "test", "subjects", "by_dataset"}
    assert sum(record["latents"].values()) == len(list(lat.glob("*.pt")))
    assert record["by_dataset"]["PT001_OASIS1"]["train"]["subjects"] >= 1
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").glob("*.pt")}
    # the same split: resumes (nothing to do after the end)
    assert main(["train", str(spec), "--resume", "auto"]) == 0
    # another test_fraction moves subjects: refused, saying what moved, nothing changed on disk
    spec = _spec(tmp_path, lat, test_fraction=0.4)
    capsys.readouterr()
    assert main(["train", str(spec), "--resume", "auto"]) == 2
    line = _one_line(capsys)
    assert "split.json: the data split differs" in line and "moved (" in line and "-> test" in line
    # another val_fraction: refused from the checkpoint's data section, before any data is built
    assert main(["train", str(_spec(tmp_path, lat, val_fraction=0.4)), "--resume", "auto"]) == 2
    assert "data.val_fraction = 0.2, now 0.4" in _one_line(capsys)
    assert json.loads(record_path.read_text()) == record
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").glob("*.pt")} == before
    # new subjects in the latent folder: refused too ("new")
    write_longitudinal(lat, longitudinal_metas({"PT007_NEW": 2}, seed=5), SHAPE)
    assert main(["train", str(_spec(tmp_path, lat)), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    # refused before repacking when the training set changes, else by split.json (new subjects in val/test only)
    assert ("not the training set" in last or "new (PT007_NEW_sub_000_ses_1" in last) and "Traceback" not in err


def test_evaluate_uses_the_test_split_by_default_and_says_so(
    tmp_path: Path, lat: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(tmp_path, lat, test_fraction=0.3)
    assert main(["train", str(spec)]) == 0
    test_names = json.loads((tmp_path / "run" / "split.json").read_text())["test"]
    assert len(test_names) >= 2
    capsys.readouterr()
    out_json = tmp_path / "ev.json"
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run"),
                "--nfe",
                "1",
                "--n",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--json",
                str(out_json),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert json.loads(out_json.read_text())["reference"] == "test"
    assert "vs test split" in capsys.readouterr().out


# ---------------------------------------------------------------- shard checksum and absurd values


def test_damaged_shard_is_caught_by_the_checksum_and_by_the_batch_check(
    tmp_path: Path, lat: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(tmp_path, lat, shard=str(tmp_path / "shard.h5"))
    assert main(["train", str(spec)]) == 0
    verified = json.loads((tmp_path / "run" / VERIFIED_FILE).read_text())
    shard = tmp_path / "shard.h5"
    assert verified["size"] == shard.stat().st_size and len(verified["content_sha256"]) == 64
    # one value changed inside the latents (0.266 -> 9e37): size unchanged
    st = shard.stat()
    with h5py.File(shard, "r+") as f:
        names = [s.decode() for s in f["names"][()]]
        f["latents"][3, 1, 2, 3, 4] = np.float32(9e37)
    capsys.readouterr()
    assert main(["train", str(spec), "--resume", "auto"]) == 2  # mtime changed: verified again, mismatch
    line = _one_line(capsys)
    assert line.startswith(f"{shard}: damaged") and "pack it again" in line
    # the same damage with the old mtime: the record matches, so no re-hash; --verify-data forces it
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["train", str(spec), "--resume", "auto", "--verify-data"]) == 2
    assert "damaged" in _one_line(capsys)
    # without --verify-data the record is trusted, and the batch check names the latent
    assert main(["train", str(spec), "--resume", "auto"]) == 2
    line = _one_line(capsys)
    assert f"latent {names[3]} in {shard}" in line and "9e+37" in line and "channel 1" in line, line


def test_absurd_value_in_a_folder_source_names_the_file(tmp_path: Path) -> None:
    from neuromf.data.prepare import prepare_data
    from neuromf.errors import UserError
    from neuromf.spec import runspec_from_dict

    write_latents(tmp_path / "lat", 12)
    x = make_latent(3)
    x[2, 1, 1, 1] = 1e30  # finite, so the file check accepts it
    torch.save(x, tmp_path / "lat" / "sub-003.pt")
    raw = tiny_run_raw(tmp_path / "lat", tmp_path / "run", max_steps=3)
    raw["data"] = {"source": "folder", "latent_dir": str(tmp_path / "lat")}
    with pytest.raises(UserError, match=r"latent sub-003: value 1e\+30, .* stds from the channel mean in channel 2"):
        prepare_data(runspec_from_dict(raw, tmp_path), torch.device("cpu"), progress=False)


def test_sigkill_during_shard_verification_leaves_no_half_record(tmp_path: Path) -> None:
    """A node killed while the shard's checksum is being checked: data/verified.json is absent or whole and true,
    never half-written or claiming a check that did not finish; the next start verifies (again) and records it."""
    import signal
    import time

    from neuromf.data.record import verify_shard_once

    lat = tmp_path / "lat"
    lat.mkdir()
    for i in range(48):  # 48 x 4 x 32^3 float32: ~25 MB, long enough to kill inside the check
        torch.save(make_latent(i, (4, 32, 32, 32)), lat / f"sub-{i:03d}.pt")
    shard = tmp_path / "shard.h5"
    assert main(["pack", str(lat), str(shard)]) == 0
    run = tmp_path / "run"
    record = run / VERIFIED_FILE
    child = (
        "import sys; from pathlib import Path; from neuromf.data.record import verify_shard_once; "
        "print('ready', flush=True); verify_shard_once(Path(sys.argv[1]), Path(sys.argv[2]), force=True, progress=False)"
    )
    for delay in (0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25):
        proc = subprocess.Popen([sys.executable, "-c", child, str(run), str(shard)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if record.exists():  # whole, and about this very shard
            got = json.loads(record.read_text())
            assert got["size"] == shard.stat().st_size and len(got["content_sha256"]) == 64
        assert not [p for p in record.parent.glob("*") if p.name != record.name and ".tmp-" not in p.name], sorted(
            record.parent.iterdir()
        )  # nothing else: at most the temporary of the killed write
    # the next start: verifies unless a whole record says this shard was verified; either way a true record after
    verify_shard_once(run, shard, progress=False)
    got = json.loads(record.read_text())
    assert got["size"] == shard.stat().st_size and got["mtime_ns"] == shard.stat().st_mtime_ns


# ---------------------------------------------------------------- pack on a full disk


PACK = """
import sys
from neuromf.cli import main
sys.exit(main(["pack", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_pack_on_a_full_disk_is_one_line_not_a_crash(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:120]}")
    try:
        write_latents(tmp_path / "lat", 12)  # 12 x 64 KiB: does not fit in 192 KiB
        out = mount / "latents.h5"
        # as is (the free-space check refuses), and with the check blind (as on a file system that reports no free
        # space): then reserving the shard's blocks meets ENOSPC, before HDF5 writes any value
        for code in (PACK, "import neuromf.data.pack as p; p._free_bytes = lambda folder: None\n" + PACK):
            proc = subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / "lat"), str(out)],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=300,
            )
            err = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not 139 (segfault)
            assert len(err) == 1 and err[0].startswith(f"{out}: cannot write the shard"), err
            assert "no space" in err[0].lower(), err
            assert list(mount.iterdir()) == []  # no shard, no temporary file
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---------------------------------------------------------------- broken latent folders


@pytest.mark.parametrize("kind", ["dangling link", "link loop", "folder named .pt"])
def test_broken_entries_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    src = tmp_path / "lat"
    write_latents(src, 3)
    if kind == "dangling link":
        os.symlink(tmp_path / "gone.pt", src / "x.pt")
        expected = "x.pt: dangling symbolic link"
    elif kind == "link loop":
        os.symlink(src / "y.pt", src / "x.pt")
        os.symlink(src / "x.pt", src / "y.pt")
        expected = "symbolic link loop"
    else:
        (src / "x.pt").mkdir()
        expected = "x.pt: is a folder, not a latent file"
    assert main(["pack", str(src), str(tmp_path / "out.h5"), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and all("Traceback" not in line for line in err) and expected in err[0], err
    assert len(err) == (2 if kind == "link loop" else 1)  # one line per broken entry
    assert not (tmp_path / "out.h5").exists()


def test_entry_appearing_after_the_shard_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lat = tmp_path / "lat"
    write_longitudinal(lat, longitudinal_metas({"PT001_OASIS1": 8}, seed=1), SHAPE)
    spec = _spec(tmp_path, lat)
    assert main(["pack", str(spec), "--no-progress"]) == 0
    capsys.readouterr()
    (lat / "later.pt").mkdir()
    assert main(["train", str(spec), "--dry-run"]) == 2
    assert "later.pt: is a folder, not a latent file" in _one_line(capsys)
    (lat / "later.pt").rmdir()
    os.symlink(tmp_path / "nowhere.pt", lat / "later.pt")
    assert main(["train", str(spec), "--dry-run"]) == 2
    assert "later.pt: dangling symbolic link" in _one_line(capsys)


# A file deleted by someone else after the folder was listed, while pack reads the others.
VANISH = """
import sys
from pathlib import Path
import neuromf.data.scan as scan
real = scan.load_latent_and_meta
def load_then_delete(data, path):
    victim = Path(sys.argv[1]) / "sub-002.pt"
    if victim.exists() and path.name == "sub-000.pt":
        victim.unlink()
    return real(data, path)
scan.load_latent_and_meta = load_then_delete
from neuromf.cli import main
sys.exit(main(["pack", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_file_vanishing_while_packing(tmp_path: Path) -> None:
    write_latents(tmp_path / "lat", 4)
    out = tmp_path / "out.h5"
    proc = subprocess.run(
        [sys.executable, "-c", VANISH, str(tmp_path / "lat"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "sub-002.pt: cannot read (FileNotFoundError" in err[0], err
    assert not out.exists()
