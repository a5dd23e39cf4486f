"""The HDF5 latent shard NeuroMF trains from: its layout and reading it back (packing: pack.py).

Layout (format "neuromf-latents", version 2; version 1 lacks the metadata datasets):
- `latents`: (N, C, D, H, W), chunked one sample per chunk, uncompressed (latents barely compress and
  chunks must read fast). float32 by default; float16; or bfloat16 stored as its raw 16 bits in a
  uint16 dataset (HDF5 has no bfloat16), marked by the `dtype` attribute "bfloat16".
- `names`: N UTF-8 strings, the file names without `.pt` (or `{dataset}_{subject}_{session}` of an
  upstream shard's slot), sorted.
- `subject`, `session`, `dataset`, `source_path`: N UTF-8 strings each, per-latent metadata (from the
  sources, else parsed from the name; "" when unknown). A version-1 shard has none: its metadata is
  parsed from the names on reading.
- root attributes: `channel_mean/std/min/max` (float64, population std, over the source values of
  all packed latents before any dtype cast), `scale_factor`, `shape` (C, D, H, W), `dtype`, `n`,
  `source_count` (all latents seen), `skipped` (JSON list), `source_sha256` (sorted names and file
  contents), `source_fingerprint` (names, sizes, mtimes: a cheap first staleness check),
  `content_sha256` (names and stored bytes: equal for equal packs), `complete` (written last).

The file is written under a hidden temporary name in the same folder, fsynced and renamed, so an
interrupted pack leaves no shard at the real name, and the temporary file lacks `complete`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from neuromf.data.meta import META_FIELDS, LatentMeta, parsed_meta
from neuromf.data.sources import hash_sources, list_source_files, source_fingerprint
from neuromf.errors import UserError

SHARD_FORMAT = "neuromf-latents"
FORMAT_VERSION = 2
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
    metas: list[LatentMeta]
    metadata_from: str  # "shard" (stored) or "names" (a version-1 shard: parsed from the names)

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
        raise UserError(
            f"{path}: not a readable HDF5 file, truncated or not a shard ({' '.join(str(e).split())[:120]})"
        ) from None
    with f:
        a = f.attrs
        if a.get("format") != SHARD_FORMAT:
            if "latents" in f and ("written" in f or "dataset_name" in a):
                raise UserError(
                    f"{path}: an upstream encoder shard, not a NeuroMF shard; pack its folder "
                    f"(neuromf pack {path.parent} OUT.h5) or set data.latent_dir to {path.parent}"
                )
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
            raise UserError(
                f"{path}: dataset shapes {ds.shape} / {f['names'].shape} disagree with n={n}, shape={shape}"
            )
        names = [str(s) for s in f["names"].asstr()[()]]
        if all(key in f and f[key].shape == (n,) for key in META_FIELDS):
            columns = {key: [str(s) for s in f[key].asstr()[()]] for key in META_FIELDS}
            metas = [LatentMeta(name, *(columns[key][i] for key in META_FIELDS)) for i, name in enumerate(names)]
            metadata_from = "shard"
        else:
            metas, metadata_from = [parsed_meta(name) for name in names], "names"
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
            metas=metas,
            metadata_from=metadata_from,
        )


class ShardReader:
    """Reads rows of a shard's latents. Opens its own read-only handle lazily, so one reader per thread."""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self._file: h5py.File | None = None

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


def _content_hash(n: int, shape: Sequence[int], dtype: str) -> hashlib._Hash:
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
    files = list_source_files(src_dir)
    if info.source_fingerprint == source_fingerprint(files):
        return True, "up to date"
    if info.source_sha256 == hash_sources(files, progress=True):  # touched or copied, same contents
        return True, "up to date (same file contents)"
    return False, f"the latents in {src_dir} changed since it was packed"
