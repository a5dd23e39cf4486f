"""Packing a folder of latent sources (`.pt` files, upstream `.h5` shards, or both) into one NeuroMF shard.

The file is written under a hidden temporary name in the same folder, fsynced
and renamed, so an interrupted pack leaves no shard at the real name, and the
temporary file lacks `complete`. A write that fails (no space, no permission)
closes the HDF5 file while the error is handled, removes the temporary file and
becomes one line naming the shard: HDF5 must not be left to close a file that
failed to flush at interpreter exit (it crashed there with a segfault).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from neuromf import __version__
from neuromf.atomic import fsync_dir
from neuromf.data.latents import (
    LatentFileError,
    check_stats_file,
    latent_name,
    load_latent_bytes,
    one_thread,
    stats_file_beside,
    warn,
)
from neuromf.data.meta import META_FIELDS, LatentMeta, parsed_meta
from neuromf.data.scan import FolderScan, read_item, scan_latents
from neuromf.data.shard import (
    FLOAT16_MAX,
    FORMAT_VERSION,
    SHARD_FORMAT,
    STORAGE,
    ShardInfo,
    _content_hash,
    open_h5,
    read_shard_info,
    to_storage,
)
from neuromf.errors import UserError
from neuromf.spec.schema import MAISI_SCALE_FACTOR


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


def _stored_meta(meta: LatentMeta) -> LatentMeta:
    """What the shard stores: the source's metadata, or (no subject there) what the name says."""
    if meta.subject:
        return meta
    parsed = parsed_meta(meta.name, meta.source_path)
    return LatentMeta(
        meta.name, parsed.subject, meta.session or parsed.session, meta.dataset or parsed.dataset, meta.source_path
    )


def _create(f: h5py.File, scan: FolderScan, dtype: str, attrs: dict) -> None:
    """Everything but the latents' values: the latents dataset allocated in full (so its space can be reserved
    before any value is written), names, metadata, and every attribute at its final size (the checksum as a
    placeholder of the same length, `complete` False)."""
    n, shape = len(scan.good), scan.shape
    assert shape is not None
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    ds = f.create_dataset(
        "latents",
        shape=(n, *shape),
        dtype=STORAGE[dtype][0],
        chunks=(1, *shape),
        track_times=False,
        dcpl=dcpl,
        fill_time="never",
    )
    ds.attrs["dtype"] = dtype
    text = h5py.string_dtype("utf-8")
    f.create_dataset("names", data=np.array(scan.names, dtype=object), dtype=text, track_times=False)
    metas = [_stored_meta(m) for m in scan.metas]
    for key in META_FIELDS:
        f.create_dataset(
            key, data=np.array([getattr(m, key) for m in metas], dtype=object), dtype=text, track_times=False
        )
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["content_sha256"] = "0" * 64
    f.attrs["complete"] = False


def _fill(f: h5py.File, scan: FolderScan, dtype: str, content: hashlib._Hash, progress: bool, label: str) -> None:
    """Write the latents' values (re-read from the sources, checked against the scan's hashes)."""
    ds = f["latents"]
    names = scan.names
    handles: dict[Path, h5py.File] = {}
    try:
        for i, item in enumerate(
            tqdm(
                scan.good,
                desc=f"packing {label}",
                unit="latent",
                disable=not progress,
                file=sys.stderr,
                mininterval=0.5,
            )
        ):
            if item.slot is None:
                try:
                    data = item.path.read_bytes()
                except OSError as e:
                    raise LatentFileError(
                        item.path, f"vanished or unreadable while packing ({e.strerror}); pack again"
                    ) from None
                if hashlib.sha256(data).hexdigest() != scan.file_hashes[item.path.name]:
                    raise LatentFileError(item.path, "changed while packing; pack again")
                x = load_latent_bytes(data, item.path)
            else:
                x = read_item(item, handles)
                if hashlib.sha256(x.numpy().tobytes()).hexdigest() != scan.item_hashes[item.name]:
                    raise LatentFileError(Path(item.where), "changed while packing; pack again")
            arr = to_storage(x, dtype)
            ds[i] = arr
            content.update(names[i].encode("utf-8") + b"\0")
            content.update(arr.tobytes())
    finally:
        for handle in handles.values():
            handle.close()


RESERVE_MARGIN = 1 << 20  # bytes reserved beyond the allocated file for the metadata written at the end


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _reserve(tmp: Path, out: Path) -> None:
    """Reserve the disk blocks of the whole shard before writing values: HDF5 (2.0) cannot close a file after a
    failed write (it crashes the interpreter), so a full disk must show here, as a plain OSError."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size + RESERVE_MARGIN)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: nothing reserved
            raise
    finally:
        os.close(fd)


def _discard(f: h5py.File | None, tmp: Path) -> None:
    """Close a failed temporary shard (errors of the close itself are expected: the disk may be full) and remove it."""
    if f is not None:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - flushing a file on a full disk fails again; the file is removed anyway
            pass
    del f
    gc.collect()  # drop h5py objects now, while the error is handled, not at interpreter exit
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _oserror_text(e: OSError) -> str:
    return " ".join(str(e).split())[:160]


def pack_latents(
    src_dir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    skip_bad: bool = False,
    scale_factor: float = MAISI_SCALE_FACTOR,
    stats_file: Path | None = None,
    check_stats: bool = True,
    progress: bool = True,
) -> PackReport:
    """Pack every latent in `src_dir` (`.pt` files and written slots of upstream shards) into `out`, atomically.

    Bad latents raise one UserError listing them all (nothing is written),
    unless `skip_bad`, which packs the good ones and lists the others in the
    report and the shard's `skipped` attribute. With `check_stats`, `stats_file`
    (default: latent_stats.json beside the latents) is compared with the
    computed statistics: a warning on stderr when they disagree.
    """
    src_dir, out = Path(src_dir), Path(out)
    if dtype not in STORAGE:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(STORAGE)}")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the shard's file name (e.g. {out / 'latents.h5'})")
    start = time.perf_counter()
    scan = scan_latents(src_dir, progress=progress)
    if (scan.bad and not skip_bad) or not scan.good:
        scan.raise_if_bad()
    assert scan.stats is not None and scan.shape is not None
    stats = scan.stats
    if dtype == "float16" and max(abs(stats.min.min()), abs(stats.max.max())) > FLOAT16_MAX:
        raise UserError(
            f"{src_dir}: values up to {max(abs(stats.min.min()), abs(stats.max.max())):.6g} overflow float16 "
            "(max 65504); use --dtype bfloat16 or float32"
        )
    if dtype == "float32" and scan.dtypes.get("float64"):
        warn(f"{scan.dtypes['float64']} latents in {src_dir} are float64; they are stored as float32")
    stats_warnings = check_stats_file(stats_file or stats_file_beside(src_dir), stats) if check_stats else []

    n, shape = len(scan.good), scan.shape
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create its folder ({' '.join(str(e).split())})") from None
    _remove_stale_temps(out)
    tmp = _temp_name(out)
    content = _content_hash(n, shape, dtype)
    sample_bytes = int(np.prod(shape)) * np.dtype(STORAGE[dtype][0]).itemsize
    need = n * sample_bytes + sum(len(m.name) + len(m.source_path) + 64 for m in scan.metas) + RESERVE_MARGIN
    free = _free_bytes(out.parent)
    if free is not None and free < need:
        raise UserError(
            f"{out}: cannot write the shard: no space left on that disk (needs {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free)"
        )
    attrs = {
        "format": SHARD_FORMAT,
        "format_version": FORMAT_VERSION,
        "n": n,
        "shape": np.asarray(shape, np.int64),
        "dtype": dtype,
        "channel_mean": stats.mean,
        "channel_std": stats.std,
        "channel_min": stats.min,
        "channel_max": stats.max,
        "stats_note": "float64 over all packed latents' source values (before any dtype cast); population std",
        "scale_factor": float(scale_factor),
        "source_count": scan.n_latents,
        "source_dir": str(src_dir.resolve()),
        "skipped": json.dumps([[latent_name(p), reason] for p, reason in scan.bad]),
        "source_sha256": scan.source_sha256,
        "source_fingerprint": scan.fingerprint,
        "created_by": f"neuromf {__version__}",
    }
    f: h5py.File | None = None
    try:
        with one_thread():
            f = open_h5(tmp, "w")
            _create(f, scan, dtype, attrs)
            f.close()
            f = None
            _reserve(tmp, out)
            f = open_h5(tmp, "r+")
            _fill(f, scan, dtype, content, progress, out.name)
            f.attrs["content_sha256"] = content.hexdigest()
            f.attrs["complete"] = True  # last: a file without it was interrupted
            f.close()
            f = None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        _discard(f, tmp)
        f = None
        if isinstance(e, OSError):  # no space, no permission, ...: the user's to fix
            raise UserError(f"{out}: cannot write the shard ({_oserror_text(e)})") from None
        raise
    info = read_shard_info(out)
    return PackReport(info, scan.bad, time.perf_counter() - start, out.stat().st_size, stats_warnings)


def format_skipped(skipped: Sequence[tuple[Path, str]]) -> str:
    """A plain-text table of skipped latents and why."""
    if not skipped:
        return ""
    width = max(len("file"), *(len(Path(p).name) for p, _ in skipped))
    lines = [f"{'file':<{width}}  reason", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{Path(p).name:<{width}}  {reason}" for p, reason in skipped]
    return "\n".join(lines)
