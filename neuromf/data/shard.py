"""The HDF5 latent shard: packing a folder of `.pt` latents into one file, and reading it back.

Layout (format "neuromf-latents", version 1):
- `latents`: (N, C, D, H, W), chunked one sample per chunk, uncompressed (latents barely compress and
  chunks must read fast). float32 by default; float16; or bfloat16 stored as its raw 16 bits in a
  uint16 dataset (HDF5 has no bfloat16), marked by the `dtype` attribute "bfloat16".
- `names`: N UTF-8 strings, the file names without `.pt`, sorted.
- root attributes: `channel_mean/std/min/max` (float64, population std, over the source values of
  all packed latents before any dtype cast), `scale_factor`, `shape` (C, D, H, W), `dtype`, `n`,
  `source_count` (all .pt files seen), `skipped` (JSON list), `source_sha256` (sorted names and file
  contents), `source_fingerprint` (names, sizes, mtimes: a cheap first staleness check),
  `content_sha256` (names and stored bytes: equal for equal packs), `complete` (written last).

The file is written under a hidden temporary name in the same folder, fsynced and renamed, so an
interrupted pack leaves no shard at the real name, and the temporary file lacks `complete`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
from tqdm import tqdm

from neuromf import __version__
from neuromf.atomic import fsync_dir
from neuromf.data.latents import (
    LatentFileError,
    FolderScan,
    check_stats_file,
    hash_sources,
    latent_name,
    list_latent_files,
    load_latent_bytes,
    one_thread,
    scan_latents,
    source_fingerprint,
    stats_file_beside,
    warn,
)
from neuromf.errors import UserError
from neuromf.spec.schema import MAISI_SCALE_FACTOR

SHARD_FORMAT = "neuromf-latents"
FORMAT_VERSION = 1
# logical dtype -> (numpy storage dtype, torch dtype in memory)
STORAGE: dict[str, tuple[type, torch.dtype]] = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
}
FLOAT16_MAX = 65504.0


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """h5py file with HDF5 file locking off: Lustre and NFS often refuse flock, and shards are read-only."""
    return h5py.File(path, mode, locking=False)


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in the shard (bfloat16: its bits as uint16)."""
    t = x.detach().to("cpu", STORAGE[dtype][1]).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored array as a tensor of its logical dtype (bfloat16 reinterpreted, no copy)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


# ---------------------------------------------------------------- reading


@dataclass
class ShardInfo:
    """What a valid shard's attributes say."""

    path: Path
    n: int
    shape: tuple[int, int, int, int]  # (C, D, H, W)
    dtype: str  # logical: float32, float16, bfloat16
    names: list[str]
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    scale_factor: float
    source_count: int
    skipped: list[tuple[str, str]]
    source_sha256: str
    source_fingerprint: str
    content_sha256: str
    source_dir: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE[self.dtype][1]

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(STORAGE[self.dtype][0]).itemsize


def read_shard_info(path: Path) -> ShardInfo:
    """Open and validate a shard's layout and attributes; UserError naming the file if anything is off."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such shard")
    try:
        f = open_h5(path)
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file, truncated or not a shard ({' '.join(str(e).split())[:120]})") from None
    with f:
        a = f.attrs
        if a.get("format") != SHARD_FORMAT:
            raise UserError(f"{path}: not a NeuroMF latent shard (no format attribute {SHARD_FORMAT!r})")
        if not bool(a.get("complete", False)):
            raise UserError(f"{path}: incomplete shard (its packing was interrupted); pack it again")
        if int(a["format_version"]) > FORMAT_VERSION:
            raise UserError(f"{path}: shard format version {int(a['format_version'])} is newer than this neuromf reads")
        if "latents" not in f or "names" not in f:
            raise UserError(f"{path}: shard lacks the 'latents' or 'names' dataset")
        ds, n, shape, dtype = f["latents"], int(a["n"]), tuple(int(s) for s in a["shape"]), str(a["dtype"])
        if dtype not in STORAGE or ds.dtype != np.dtype(STORAGE[dtype][0]):
            raise UserError(f"{path}: latents are stored as {ds.dtype} but the dtype attribute says {dtype!r}")
        if ds.shape != (n, *shape) or f["names"].shape != (n,):
            raise UserError(f"{path}: dataset shapes {ds.shape} / {f['names'].shape} disagree with n={n}, shape={shape}")
        names = [str(s) for s in f["names"].asstr()[()]]
        return ShardInfo(
            path=path,
            n=n,
            shape=shape,  # type: ignore[arg-type]
            dtype=dtype,
            names=names,
            mean=np.asarray(a["channel_mean"], np.float64),
            std=np.asarray(a["channel_std"], np.float64),
            min=np.asarray(a["channel_min"], np.float64),
            max=np.asarray(a["channel_max"], np.float64),
            scale_factor=float(a["scale_factor"]),
            source_count=int(a["source_count"]),
            skipped=[tuple(s) for s in json.loads(str(a["skipped"]))],  # type: ignore[misc]
            source_sha256=str(a["source_sha256"]),
            source_fingerprint=str(a["source_fingerprint"]),
            content_sha256=str(a["content_sha256"]),
            source_dir=str(a["source_dir"]),
        )


class ShardReader:
    """Reads rows of a shard's latents. Opens its own read-only handle lazily, so one reader per thread."""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self._file: Optional[h5py.File] = None

    def read(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), C, D, H, W) in the shard's logical dtype, on the CPU; rows in any order."""
        if self._file is None:
            self._file = open_h5(self.info.path)
        ds = self._file["latents"]
        out = np.empty((len(rows), *self.info.shape), dtype=ds.dtype)
        for k, row in enumerate(rows):  # one chunk per row: a direct chunk read each
            ds.read_direct(out, np.s_[int(row)], np.s_[k])
        return from_storage(out, self.info.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_shard(path: Path) -> tuple[torch.Tensor, list[str]]:
    """All latents (logical dtype, CPU) and names of a shard. For tests and small shards."""
    info = read_shard_info(path)
    with open_h5(path) as f:
        return from_storage(f["latents"][()], info.dtype), info.names


def _content_hash(n: int, shape: Sequence[int], dtype: str) -> "hashlib._Hash":
    h = hashlib.sha256()
    h.update(json.dumps({"format": SHARD_FORMAT, "n": n, "shape": list(shape), "dtype": dtype}).encode())
    return h


def content_checksum(path: Path) -> str:
    """Recompute a shard's content checksum from what is stored (names and latent bytes)."""
    info = read_shard_info(path)
    h = _content_hash(info.n, info.shape, info.dtype)
    with open_h5(path) as f:
        ds = f["latents"]
        for i, name in enumerate(info.names):
            h.update(name.encode("utf-8") + b"\0")
            h.update(np.ascontiguousarray(ds[i]).tobytes())
    return h.hexdigest()


def shard_freshness(shard: Path, src_dir: Path) -> tuple[bool, str]:
    """(fresh, why): is `shard` a complete pack of the current contents of `src_dir`?"""
    shard = Path(shard)
    if not shard.exists():
        return False, "it does not exist yet"
    try:
        info = read_shard_info(shard)
    except UserError as e:
        return False, e.problems[0]
    files = list_latent_files(src_dir)
    if info.source_fingerprint == source_fingerprint(files):
        return True, "up to date"
    if info.source_sha256 == hash_sources(files, progress=True):  # touched or copied, same contents
        return True, "up to date (same file contents)"
    return False, f"the latents in {src_dir} changed since it was packed"


# ---------------------------------------------------------------- packing


@dataclass
class PackReport:
    """What a pack did."""

    info: ShardInfo
    skipped: list[tuple[Path, str]]
    seconds: float
    nbytes: int
    stats_warnings: list[str]


def _temp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.{socket.gethostname()}.{os.getpid()}.tmp"


def _remove_stale_temps(out: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporaries of earlier packs to `out` that were killed (dead pid on this host, or untouched for an hour)."""
    host = socket.gethostname()
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        parts = tmp.name[len(out.name) + 2 : -len(".tmp")].rsplit(".", 1)
        dead = False
        if len(parts) == 2 and parts[0] == host and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        try:
            if dead or time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except OSError:
            pass


def pack_latents(
    src_dir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    skip_bad: bool = False,
    scale_factor: float = MAISI_SCALE_FACTOR,
    stats_file: Optional[Path] = None,
    progress: bool = True,
) -> PackReport:
    """Pack every `.pt` latent in `src_dir` into the shard `out`, atomically.

    Bad files raise one UserError listing them all (nothing is written), unless
    `skip_bad`, which packs the good ones and lists the others in the report
    and the shard's `skipped` attribute. `stats_file` (default: latent_stats.json
    beside the latents) is compared with the computed statistics: a warning on
    stderr when they disagree.
    """
    src_dir, out = Path(src_dir), Path(out)
    if dtype not in STORAGE:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(STORAGE)}")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the shard's file name (e.g. {out / 'latents.h5'})")
    start = time.perf_counter()
    scan: FolderScan = scan_latents(src_dir, progress=progress)
    if scan.bad and not skip_bad:
        scan.raise_if_bad()
    if not scan.good:
        scan.raise_if_bad()
    assert scan.stats is not None and scan.shape is not None
    stats = scan.stats
    if dtype == "float16" and max(abs(stats.min.min()), abs(stats.max.max())) > FLOAT16_MAX:
        raise UserError(f"{src_dir}: values up to {max(abs(stats.min.min()), abs(stats.max.max())):.6g} overflow float16 "
                        "(max 65504); use --dtype bfloat16 or float32")
    if dtype == "float32" and scan.dtypes.get("float64"):
        warn(f"{scan.dtypes['float64']} latents in {src_dir} are float64; they are stored as float32")
    stats_warnings = check_stats_file(stats_file or stats_file_beside(src_dir), stats)

    n, shape = len(scan.good), scan.shape
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create its folder ({' '.join(str(e).split())})") from None
    _remove_stale_temps(out)
    tmp = _temp_name(out)
    content = _content_hash(n, shape, dtype)
    try:
        with one_thread(), open_h5(tmp, "w") as f:
            ds = f.create_dataset(
                "latents", shape=(n, *shape), dtype=STORAGE[dtype][0], chunks=(1, *shape), track_times=False
            )
            ds.attrs["dtype"] = dtype
            names = scan.names
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype("utf-8"), track_times=False)
            for i, p in enumerate(tqdm(scan.good, desc=f"packing {out.name}", unit="latent", disable=not progress,
                                       file=sys.stderr, mininterval=0.5)):
                data = p.read_bytes()
                if hashlib.sha256(data).hexdigest() != scan.file_hashes[p.name]:
                    raise LatentFileError(p, "changed while packing; pack again")
                arr = to_storage(load_latent_bytes(data, p), dtype)
                ds[i] = arr
                content.update(names[i].encode("utf-8") + b"\0")
                content.update(arr.tobytes())
            a = f.attrs
            a["format"] = SHARD_FORMAT
            a["format_version"] = FORMAT_VERSION
            a["n"] = n
            a["shape"] = np.asarray(shape, np.int64)
            a["dtype"] = dtype
            a["channel_mean"] = stats.mean
            a["channel_std"] = stats.std
            a["channel_min"] = stats.min
            a["channel_max"] = stats.max
            a["stats_note"] = "float64 over all packed latents' source values (before any dtype cast); population std"
            a["scale_factor"] = float(scale_factor)
            a["source_count"] = len(scan.files)
            a["source_dir"] = str(src_dir.resolve())
            a["skipped"] = json.dumps([[latent_name(p), reason] for p, reason in scan.bad])
            a["source_sha256"] = scan.source_sha256
            a["source_fingerprint"] = scan.fingerprint
            a["content_sha256"] = content.hexdigest()
            a["created_by"] = f"neuromf {__version__}"
            a["complete"] = True  # last: a file without it was interrupted
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # no space, no permission, ...: the user's to fix
            raise UserError(f"{out}: cannot write the shard ({' '.join(str(e).split())[:160]})") from None
        raise
    info = read_shard_info(out)
    return PackReport(info, scan.bad, time.perf_counter() - start, out.stat().st_size, stats_warnings)


def format_skipped(skipped: Sequence[tuple[Path, str]]) -> str:
    """A plain-text table of skipped files and why."""
    if not skipped:
        return ""
    width = max(len("file"), *(len(Path(p).name) for p, _ in skipped))
    lines = [f"{'file':<{width}}  reason", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{Path(p).name:<{width}}  {reason}" for p, reason in skipped]
    return "\n".join(lines)
