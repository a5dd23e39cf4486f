"""Files that appear whole or not at all: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from neuromf.errors import UserError


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def writable_folder(path: Path) -> bool:
    """True if `path` is a writable folder or could be created as one."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def check_output(path: Path, option: str, *, folder: bool = False) -> None:
    """Refuse an output (file, or `folder`) that cannot be written, before any long work: UserError naming `option`."""
    if not folder and path.is_dir():
        raise UserError(f"{option}: {path} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{option}: {path} exists and is not a folder")
    if not writable_folder(path if folder else path.parent):
        raise UserError(f"{option}: cannot write {path} (a parent is not a folder, or is not writable)")
