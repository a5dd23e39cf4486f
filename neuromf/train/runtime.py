"""What a run-spec asks of the process: threads, caches, seeds and determinism.

Shared by `neuromf train` (neuromf/train/loop.py) and `neuromf bench`, so both run the same set-up. The device
and the precision are decided in neuromf/device.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["configure_caches", "configure_torch", "writable_folder"]


def writable_folder(folder: str | Path) -> bool:
    """True when `folder` exists or can be created, and this user can write in it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def user_tmp() -> Path:
    """A per-user folder under /tmp: a node's /tmp is shared, and a folder one user made is closed to the next."""
    return Path(tempfile.gettempdir()) / f"neuromf-{os.getuid()}"


def configure_caches(spec: RunSpec) -> dict[str, str]:
    """Point every compile and config cache at a folder this user can write, never at $HOME or the image.

    An explicit `paths.cache_dir` wins over the environment (the image sets TORCHINDUCTOR_CACHE_DIR); otherwise a
    folder the environment names is kept when writable, and a per-user folder under /tmp is used when not (a
    read-only image, or a folder another user made). Triton's cache follows Inductor's unless named and writable.
    Returns the values set, for the log.
    """
    chosen: dict[str, str] = {}

    def use(name: str, folder: Path, field: str = "") -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{field or name}: cannot create the cache folder {folder}: {e.strerror}") from None
        os.environ[name] = chosen[name] = str(folder)

    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if spec.paths.cache_dir is not None:
        use("TORCHINDUCTOR_CACHE_DIR", spec.paths.cache_dir, "paths.cache_dir")
        use("TRITON_CACHE_DIR", spec.paths.cache_dir / "triton", "paths.cache_dir")
    else:
        if not (inductor and writable_folder(inductor)):
            use("TORCHINDUCTOR_CACHE_DIR", user_tmp() / "torchinductor")
        triton = os.environ.get("TRITON_CACHE_DIR")
        if not (triton and writable_folder(triton)):
            use("TRITON_CACHE_DIR", Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "triton")
    # matplotlib (imported by some dependencies) and XDG-following tools default to $HOME, which may be read-only.
    for name, sub in (("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "cache")):
        current = os.environ.get(name)
        if not (current and writable_folder(current)):
            use(name, user_tmp() / sub)
    return chosen


def configure_torch(spec: RunSpec, device: torch.device) -> None:
    if spec.hardware.num_threads:
        torch.set_num_threads(spec.hardware.num_threads)
    configure_caches(spec)
    torch.manual_seed(spec.training.seed)
    if spec.training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
