"""A folder of latent sources: `.pt` files, upstream per-dataset `.h5` shards, or both.

Listing checks every entry before anything reads it: a dangling symbolic link,
a link loop, a folder named `*.pt`, a file that vanishes between listing and
reading are each one line naming the entry (UserError, exit 2), never a
traceback. NeuroMF's own shards in the folder are outputs and are skipped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from neuromf.data.meta import LatentMeta
from neuromf.errors import UserError

SOURCE_SUFFIXES = (".pt", ".h5")


@dataclass(frozen=True)
class LatentItem:
    """One latent: a `.pt` file (slot None) or one written slot of an upstream shard."""

    name: str
    path: Path
    slot: int | None
    meta: LatentMeta

    @property
    def where(self) -> str:
        return str(self.path) if self.slot is None else f"{self.path}[{self.slot}]"


def _entry_problem(p: Path) -> str | None:
    """Why a listed entry cannot be a latent source, or None."""
    try:
        st = os.stat(p)  # follows links
    except FileNotFoundError:
        if p.is_symlink():
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return f"{p}: dangling symbolic link (its target {target} does not exist)"
        return f"{p}: vanished while the folder was being read; run again"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{p}: symbolic link loop"
        return f"{p}: cannot be read ({os.strerror(e.errno) if e.errno else e})"
    if stat.S_ISDIR(st.st_mode):
        return f"{p}: is a folder, not a latent file"
    if not stat.S_ISREG(st.st_mode):
        return f"{p}: is not a regular file"
    return None


def list_source_files(folder: Path) -> list[Path]:
    """The `.pt` files and upstream `.h5` shards directly in `folder`, sorted by name; UserError when none or a bad entry."""
    from neuromf.data.upstream import is_neuromf_shard

    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise UserError(
                f"{folder}: no such folder" if not folder.exists() else f"{folder}: is not a folder of latents"
            )
        entries = sorted(
            (p for p in folder.iterdir() if p.name.endswith(SOURCE_SUFFIXES) and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
    except OSError as e:
        raise UserError(f"{folder}: cannot list the folder ({os.strerror(e.errno) if e.errno else e})") from None
    problems = [line for line in map(_entry_problem, entries) if line]
    if problems:
        raise UserError(*problems)
    files = [p for p in entries if not (p.name.endswith(".h5") and is_neuromf_shard(p))]
    if not files:
        raise UserError(f"{folder}: no .pt files or upstream .h5 shards in this folder (empty or wrong folder)")
    return files


def list_latent_files(folder: Path) -> list[Path]:
    """Alias of list_source_files (the folder may hold .pt files and upstream .h5 shards)."""
    return list_source_files(folder)


def _digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def source_fingerprint(files: Sequence[Path]) -> str:
    """Cheap identity of the sources (names, sizes, modification times): equal means unchanged, almost surely."""
    lines = []
    for p in sorted(files, key=lambda p: p.name):
        try:
            st = p.stat()
        except OSError as e:
            raise UserError(
                f"{p}: vanished or unreadable while the folder was being read ({os.strerror(e.errno) if e.errno else e}); run again"
            ) from None
        lines.append(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}")
    return _digest(lines)


def source_checksum(file_hashes: dict[str, str]) -> str:
    """sha256 over the sorted file names and the sha256 of each file's bytes."""
    return _digest([f"{name}\0{file_hashes[name]}" for name in sorted(file_hashes)])


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks; UserError (one line) when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({os.strerror(e.errno) if e.errno else e}); run again") from None
    return h.hexdigest()


def hash_sources(files: Sequence[Path], progress: bool = False) -> str:
    """source_checksum of files on disk (reads them all)."""
    hashes = {}
    for p in tqdm(files, desc="hashing latents", unit="file", disable=not progress, file=sys.stderr):
        hashes[p.name] = file_sha256(p)
    return source_checksum(hashes)
