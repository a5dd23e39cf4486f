"""Reading a whole folder of latent sources once: check, hash, metadata and per-channel statistics.

`scan_latents` validates every latent (`.pt` file or written slot of an
upstream shard), finds the common shape, hashes the sources (so a stale shard
is detected), keeps each latent's metadata and computes per-channel statistics
in float64 (Chan's parallel mean/variance merge, so nothing but a few numbers
per latent is kept in memory).
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from neuromf.data.latents import (
    ChannelStats,
    LatentFileError,
    _short,
    check_latent,
    latent_name,
    load_latent_and_meta,
    one_thread,
)
from neuromf.data.meta import LatentMeta, meta_from_dict
from neuromf.data.sources import LatentItem, file_sha256, list_source_files, source_checksum, source_fingerprint
from neuromf.data.upstream import read_upstream
from neuromf.errors import UserError


@dataclass
class FolderScan:
    """Everything one read of a latent folder learns."""

    folder: Path
    files: list[Path]  # all source files (.pt and upstream .h5), sorted
    good: list[LatentItem]  # readable, valid, of the common shape (sorted by name)
    bad: list[tuple[Path, str]]  # (file or file[slot], reason)
    shape: tuple[int, ...] | None  # common (C, D, H, W)
    dtypes: Counter = field(default_factory=Counter)  # source dtype -> count (good latents)
    stats: ChannelStats | None = None  # over the good latents
    file_hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256, every file
    item_hashes: dict[str, str] = field(default_factory=dict)  # latent name -> sha256 of its bytes (upstream slots)
    source_sha256: str = ""
    fingerprint: str = ""
    n_latents: int = 0  # all latents seen (good and bad)

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.good]

    @property
    def metas(self) -> list[LatentMeta]:
        return [item.meta for item in self.good]

    def raise_if_bad(self, limit: int = 20) -> None:
        """UserError listing the bad latents (at most `limit` lines, then a count)."""
        if not self.bad:
            return
        lines = [f"{p}: {reason}" for p, reason in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"{self.folder}: ... and {len(self.bad) - limit} more bad latents")
        lines.append(
            f"{self.folder}: {len(self.bad)} of {self.n_latents} latents are bad (--skip-bad packs the others)"
        )
        raise UserError(*lines)


def read_item(item: LatentItem, handles: dict[Path, h5py.File] | None = None) -> torch.Tensor:
    """One latent's checked (C, D, H, W) tensor. `handles` caches open upstream shards (the caller closes them)."""
    if item.slot is None:
        try:
            data = item.path.read_bytes()
        except OSError as e:
            raise LatentFileError(item.path, f"cannot read ({_short(e)})") from None
        return load_latent_and_meta(data, item.path)[0]
    try:
        if handles is not None and item.path in handles:
            f = handles[item.path]
        else:
            f = h5py.File(item.path, "r", locking=False)
            if handles is not None:
                handles[item.path] = f
        arr = np.asarray(f["latents"][item.slot])
        if handles is None:
            f.close()
    except (OSError, KeyError) as e:
        raise LatentFileError(Path(item.where), f"cannot read ({_short(e)})") from None
    return check_latent(torch.from_numpy(arr), Path(item.where))


def scan_latents(folder: Path, progress: bool = True) -> FolderScan:
    """Read every latent in `folder` once: check it, hash it, keep its metadata, accumulate float64 statistics.

    Latents whose shape differs from the most common shape are bad. Statistics
    cover only the good latents. Raises UserError when the folder itself is
    wrong (missing, empty, a bad entry, an upstream shard without latents or
    written slots, upstream shards of different shapes, two latents of one
    name); bad `.pt` files and slots are listed in the result.
    """
    files = list_source_files(folder)
    fingerprint = source_fingerprint(files)
    upstream = {p: read_upstream(p) for p in files if p.name.endswith(".h5")}
    shapes = {u.shape for u in upstream.values()}
    if len(shapes) > 1:
        first, *others = sorted(upstream.values(), key=lambda u: u.path.name)
        other = next(u for u in others if u.shape != first.shape)
        raise UserError(
            f"{other.path}: latents of shape {list(other.shape)}, but {first.path} has {list(first.shape)}; "
            "pack shards of one shape"
        )
    hashes: dict[str, str] = {}
    item_hashes: dict[str, str] = {}
    valid: list[tuple[LatentItem, tuple[int, ...], torch.dtype, ChannelStats]] = []
    bad: list[tuple[Path, str]] = []
    n_latents = sum(1 for p in files if p.name.endswith(".pt")) + sum(len(u.slots) for u in upstream.values())
    bar = tqdm(
        total=n_latents, desc="checking latents", unit="latent", disable=not progress, file=sys.stderr, mininterval=0.5
    )
    with one_thread(), bar:
        for p in files:
            if p in upstream:
                u = upstream[p]
                hashes[p.name] = file_sha256(p)
                try:
                    with h5py.File(p, "r", locking=False) as f:
                        ds = f["latents"]
                        for slot, meta in zip(u.slots, u.metas):
                            item = LatentItem(meta.name, p, slot, meta)
                            bar.update()
                            arr = np.asarray(ds[slot])
                            item_hashes[meta.name] = hashlib.sha256(arr.tobytes()).hexdigest()
                            try:
                                x = check_latent(torch.from_numpy(arr), Path(item.where))
                            except LatentFileError as e:
                                bad.append((Path(item.where), e.reason))
                                continue
                            valid.append((item, tuple(x.shape), x.dtype, ChannelStats.of(x)))
                except OSError as e:
                    raise UserError(f"{p}: cannot read its latents ({_short(e)})") from None
                continue
            bar.update()
            try:
                data = p.read_bytes()
            except OSError as e:
                bad.append((p, f"cannot read ({_short(e)})"))
                continue
            hashes[p.name] = hashlib.sha256(data).hexdigest()
            try:
                x, raw_meta = load_latent_and_meta(data, p)
            except LatentFileError as e:
                bad.append((p, e.reason))
                continue
            name = latent_name(p)
            valid.append(
                (LatentItem(name, p, None, meta_from_dict(name, raw_meta)), tuple(x.shape), x.dtype, ChannelStats.of(x))
            )
    seen: dict[str, LatentItem] = {}
    for item, *_ in valid:
        if item.name in seen:
            raise UserError(
                f"{folder}: two latents are named {item.name!r} ({seen[item.name].where} and {item.where}); "
                "keep one of them"
            )
        seen[item.name] = item
    shape = None
    good: list[LatentItem] = []
    stats: ChannelStats | None = None
    dtypes: Counter = Counter()
    if valid:
        counts = Counter(s for _, s, _, _ in valid)
        top = max(counts.values())
        shape = next(s for _, s, _, _ in valid if counts[s] == top)  # most common; ties: the first file's
        for item, s, dtype, st in valid:
            if s != shape:
                bad.append((Path(item.where), f"shape {list(s)} differs from {list(shape)} of the other {top} latents"))
                continue
            good.append(item)
            dtypes[str(dtype).replace("torch.", "")] += 1
            stats = st if stats is None else stats.merge(st)
    good.sort(key=lambda item: item.name)
    bad.sort(key=lambda entry: entry[0].name)
    return FolderScan(
        folder=Path(folder),
        files=files,
        good=good,
        bad=bad,
        shape=shape,
        dtypes=dtypes,
        stats=stats,
        file_hashes=hashes,
        item_hashes=item_hashes,
        source_sha256=source_checksum(hashes) if len(hashes) == len(files) else "",
        fingerprint=fingerprint,
        n_latents=n_latents,
    )


def folder_metas(folder: Path, read_pt: bool = True) -> list[LatentMeta]:
    """Every latent's metadata in a folder of sources, without checking values (validate --check-paths).
    read_pt=False names .pt latents by file name only (no file is loaded)."""
    metas: list[LatentMeta] = []
    for p in list_source_files(folder):
        if p.name.endswith(".h5"):
            metas.extend(read_upstream(p).metas)
            continue
        name, raw = latent_name(p), None
        if read_pt:
            try:
                raw = load_latent_and_meta(p.read_bytes(), p)[1]
            except (OSError, LatentFileError):
                pass  # pack and train report bad files; here only the subject matters
        metas.append(meta_from_dict(name, raw))
    return metas
