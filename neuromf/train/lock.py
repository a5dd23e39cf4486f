"""The run-folder lock: one trainer per run folder.

`<run_dir>/.lock` is held with `fcntl.flock` for the whole run and names its
holder (host, PID, SLURM job id, start time). A second trainer on the same
folder is refused with one line naming the holder. The kernel drops the lock
when its process dies, so a `.lock` file left by a killed run blocks nothing; a
lock still held by an earlier run of the same SLURM job (a requeue whose old
node has not yet released it) is taken over. Where the file system has no
flock (ENOLCK/EOPNOTSUPP), the holder named in the file decides: a live PID on
this host blocks, anything else is stale.

In a multi-process run only rank 0 locks (before any rank writes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from neuromf.atomic import pid_alive, write_error
from neuromf.errors import UserError

LOCK_NAME = ".lock"
_HELD: dict[str, RunLock] = {}  # realpath -> the lock this process holds (a second Trainer in one process shares it)


def _holder_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (its details are unreadable)"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"PID {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


def _read_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Holds `<run_dir>/.lock`; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd, self.users = path, fd, 1

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (created if needed) or raise UserError naming the holder."""
        key = os.path.realpath(run_dir)
        if key in _HELD:
            held = _HELD[key]
            held.users += 1
            return held
        path = run_dir / LOCK_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"paths.run_dir: {run_dir} is not writable ({os.strerror(e.errno)}); nothing was changed"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            job = os.environ.get("SLURM_JOB_ID")
            if not (job and info.get("slurm_job_id") == job):
                os.close(fd)
                raise UserError(
                    f"paths.run_dir: {run_dir} is in use by another trainer ({_describe(info)}); "
                    f"wait for it or stop it (lock file {path})"
                ) from None
            print(f"taking over {path} from an earlier run of SLURM job {job} (requeued)", flush=True)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            info = _read_info(fd)  # no flock here: judge by the holder's record
            if (
                info.get("host") == socket.gethostname()
                and pid_alive(int(info.get("pid") or 0))
                and int(info.get("pid") or 0) != os.getpid()
            ):
                os.close(fd)
                raise UserError(f"paths.run_dir: {run_dir} is in use by another trainer ({_describe(info)})") from None
        lock = cls(path, fd)
        try:
            data = (json.dumps(_holder_info()) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            lock.close()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise write_error(path, e) from None
            raise
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            _HELD.pop(os.path.realpath(self.path.parent), None)
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock; the file stays (harmless, reused)
            self.fd = -1
