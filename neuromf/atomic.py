"""Files that appear whole or not at all: write a temporary file beside the target, fsync, rename.

A write that fails because the disk is full, the quota is spent or the folder is
read-only (ENOSPC, EDQUOT, EFBIG, EACCES, EPERM, EROFS) becomes a UserError naming
the file: one line, exit 2, and the previous file (if any) untouched. The
temporary `.NAME.tmp-PID` of a killed writer is removed by the next start
(`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from neuromf.errors import UserError

# Errors a user fixes by freeing space or changing permissions, not by reading a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def write_error(path: Path, e: OSError) -> UserError:
    """One line for a write that failed for a reason the user can fix."""
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    return UserError(f"{path}: cannot write ({os.strerror(e.errno or 0)}); {kept}")


class _RecordingFile:
    """A file whose write errors are remembered: torch.save turns them into a RuntimeError without the errno."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only if the block completes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    recorder: _RecordingFile | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            recorder = _RecordingFile(f)
            yield recorder  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
    except Exception as e:
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
            raise write_error(path, cause) from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: there is no temporary to remove


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


def pid_alive(pid: int) -> bool:
    """Is process `pid` running on this machine? (A PID of another user's process counts as alive.)"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the `.NAME.tmp-PID` files under `folder` whose writer PID is no longer running here.

    Call it with the run folder locked: the only writers in there are then this
    process and its ranks, so a temporary of a dead PID is a killed write.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "wandb"]  # wandb's own files, never ours
        for name in files:
            m = TEMPORARY.match(name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                path = Path(root) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


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
