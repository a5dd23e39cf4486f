"""The upstream encoder's per-dataset HDF5 shards (`{dataset}.h5`), read as latent sources.

Layout: `latents` float32 (N, C, D, H, W), one sample per chunk; `written`
bool (N,) (the encoder resumes: False slots are not written yet); `subject_id`,
`session_id`, `source_path` variable-length strings (N,); attributes
`dataset_name`, `n_volumes`, `n_written`, `latent_shape`, `dtype`,
`scale_factor`. Only written slots are latents. A slot is named
`{dataset}_{subject}_{session}` like the upstream `.pt` files (or
`{file stem}_{slot}` when the shard has no subject ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from neuromf.data.meta import LatentMeta
from neuromf.errors import UserError


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({' '.join(str(e).split())[:120]})") from None


def is_neuromf_shard(path: Path) -> bool:
    """True when `path` is an HDF5 file with NeuroMF's shard format attribute (an output, not a source)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs.get("format") == "neuromf-latents"
    except OSError:
        return False


def _strings(f: h5py.File, key: str, n: int, path: Path) -> list[str] | None:
    if key not in f:
        return None
    ds = f[key]
    if ds.shape != (n,):
        raise UserError(f"{path}: '{key}' has shape {ds.shape}, the latents have {n} slots")
    try:
        return [str(s) for s in ds.asstr()[()]]
    except (TypeError, ValueError, OSError):
        raise UserError(f"{path}: '{key}' is not a string dataset") from None


@dataclass
class UpstreamShard:
    """One upstream shard's written slots and their metadata."""

    path: Path
    dataset: str
    shape: tuple[int, ...]  # (C, D, H, W)
    slots: list[int]  # written slots, ascending
    metas: list[LatentMeta]  # one per written slot
    n_slots: int

    def read(self, f: h5py.File, slot: int) -> np.ndarray:
        return np.asarray(f["latents"][slot])


def read_upstream(path: Path) -> UpstreamShard:
    """Validate an upstream shard's layout; UserError (one line) when it has no `latents`, no written slot, ..."""
    path = Path(path)
    with _open(path) as f:
        if "latents" not in f or not isinstance(f["latents"], h5py.Dataset):
            raise UserError(f"{path}: no 'latents' dataset (not an upstream encoder shard)")
        ds = f["latents"]
        if ds.ndim != 5 or ds.shape[0] == 0:
            raise UserError(f"{path}: 'latents' has shape {list(ds.shape)}; expected (N, C, D, H, W)")
        if ds.dtype.kind != "f":
            raise UserError(f"{path}: 'latents' has dtype {ds.dtype}, not floating point")
        n, shape = int(ds.shape[0]), tuple(int(s) for s in ds.shape[1:])
        if "written" in f:
            written = np.asarray(f["written"][()]).astype(bool).reshape(-1)
            if written.shape != (n,):
                raise UserError(f"{path}: 'written' has {written.size} entries, 'latents' has {n} slots")
        else:  # an encoder that does not resume: every slot is written
            written = np.ones(n, dtype=bool)
        slots = [int(i) for i in np.flatnonzero(written)]
        if not slots:
            raise UserError(f"{path}: no written slots (0 of {n}); the encoder has not finished any volume of it")
        raw_name = f.attrs.get("dataset_name", path.stem)
        dataset = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        subjects = _strings(f, "subject_id", n, path)
        sessions = _strings(f, "session_id", n, path)
        sources = _strings(f, "source_path", n, path)
    metas = []
    for i in slots:
        subject = subjects[i] if subjects else ""
        session = sessions[i] if sessions else ""
        name = "_".join(p for p in (dataset, subject, session) if p) if subject else f"{path.stem}_{i:05d}"
        metas.append(LatentMeta(name, subject, session, dataset, sources[i] if sources else ""))
    return UpstreamShard(path, dataset, shape, slots, metas, n)
