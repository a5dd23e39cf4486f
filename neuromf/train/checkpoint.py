"""Checkpoints: complete-or-absent files, exact-resume state, finding the newest good one.

Layout under `<run_dir>/checkpoints/`:
  latest.pt        every `checkpoint.latest_every_n_steps`, at epoch ends and on stop signals
  latest.prev.pt   the one before (a fallback if latest.pt is ever damaged)
  epoch_NNNN.pt    every `checkpoint.save_every_n_epochs` (the last `keep_last` kept)
  best.pt          lowest validation MSE of the EMA weights

Every file holds the fields of docs/design.md, 'Checkpoints' (epoch, global_step, model_state_dict,
ema_state_dict, optimizer_state_dict, scheduler_state_dict, config, loss_history)
plus what exact resume needs: all RNG states and the data order. Only plain
containers and tensors are stored, so `torch.load(weights_only=True)` reads them.

Integrity: every file carries "sha256", a digest of everything else in it
(tensor bytes, dtypes, shapes, keys and plain values), computed at save time
and checked on load, so a flipped byte in tensor data is found, not trained on.
A resume tries latest.pt, latest.prev.pt, the epoch files (newest first) and
best.pt, skipping with one line each any that is empty, truncated, not a
checkpoint, lacks a key, fails its digest or holds NaN/Inf; when files exist but
none loads it refuses (UserError listing them) rather than start over them.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.atomic import atomic_open
from neuromf.errors import UserError

FORMAT = "neuromf-checkpoint-v1"
DIGEST_KEY = "sha256"
# What a resume reads (neuromf/train/loop.py); a file without one of these cannot continue a run.
RESUME_KEYS = (
    "model_state_dict",
    "ema_state_dict",
    "ema_all",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "config",
    "progress",
    "rng",
    "data_state",
)
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


# ---------------------------------------------------------------- RNG state


def capture_rng_states(extra: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """torch (CPU and CUDA), numpy, Python and named generators, as tensors and plain lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (extra or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any], extra: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (extra or {}).items():
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------- integrity


def _tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach()
    h = hashlib.sha256(f"T{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def _feed(h: Any, obj: Any, tensors: Iterator[bytes]) -> None:
    """Hash `obj` by content: tensors by their digests (dtype, shape, bytes); containers by their items in order."""
    if isinstance(obj, torch.Tensor):
        h.update(next(tensors))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k, tensors)
            _feed(h, v, tensors)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v, tensors)
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    elif obj is None or isinstance(obj, (bool, int, str, bytes, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}{obj!r};".encode())
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} in a checkpoint")


def _tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_of(k)
            yield from _tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_of(v)


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of a checkpoint's content (every key but the digest itself).

    The tensors are hashed on several threads (hashlib releases the GIL): a production checkpoint holds GBs.
    """
    from concurrent.futures import ThreadPoolExecutor

    content = {k: v for k, v in state.items() if k != DIGEST_KEY}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, _tensors_of(content)))
    h = hashlib.sha256()
    _feed(h, content, iter(digests))
    return h.hexdigest()


# ---------------------------------------------------------------- files


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def save_checkpoint_file(state: dict[str, Any], path: Path) -> Path:
    """Write `state` with its digest, whole or not at all."""
    atomic_torch_save({**state, DIGEST_KEY: state_digest(state)}, path)
    return path


def assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """No NaN/Inf may ever reach a checkpoint."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RuntimeError(f"refusing to save a checkpoint: {what}[{key}] holds NaN or Inf")


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (an exception's message may be empty or many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


class CheckpointDir:
    """Saving, rotating and finding checkpoints of one run."""

    def __init__(self, run_dir: Path, keep_last: int = 3) -> None:
        self.folder = run_dir / "checkpoints"
        self.keep_last = keep_last

    @property
    def latest(self) -> Path:
        return self.folder / "latest.pt"

    @property
    def staged(self) -> Path:
        return self.folder / ".latest.staged.pt"

    def save_latest(self, state: dict[str, Any]) -> Path:
        save_checkpoint_file(state, self.staged)
        if self.latest.exists():
            os.replace(self.latest, self.folder / "latest.prev.pt")
        os.replace(self.staged, self.latest)
        return self.latest

    def save_epoch(self, state: dict[str, Any], epoch: int) -> Path:
        path = save_checkpoint_file(state, self.folder / f"epoch_{epoch:04d}.pt")
        for old in self.epoch_files()[self.keep_last :]:
            old.unlink()
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return save_checkpoint_file(state, self.folder / "best.pt")

    def recover_staged(self) -> None:
        """A kill between save_latest's two renames leaves latest.pt missing and the staged file whole: use it.

        Call with the run folder locked (no other writer)."""
        if self.staged.exists():
            if self.latest.exists():
                self.staged.unlink()
            else:
                os.replace(self.staged, self.latest)

    def epoch_files(self) -> list[Path]:
        """epoch_NNNN.pt files, newest epoch first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def resume_candidates(self) -> list[Path]:
        """Checkpoints a run can continue from, in the order tried: latest, latest.prev, epochs (newest first), best."""
        named = [self.latest, self.folder / "latest.prev.pt"]
        candidates = [p for p in named if p.is_file()] + self.epoch_files()
        best = self.folder / "best.pt"
        return candidates + ([best] if best.is_file() else [])

    def load_newest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The first candidate that loads completely; damaged ones are skipped with a message.

        None when there is no checkpoint at all; UserError (listing each file and why) when there are
        checkpoints and none of them loads: starting fresh would overwrite the run.
        """
        candidates = self.resume_candidates()
        reasons = []
        for path in candidates:
            try:
                state = load_checkpoint(path, map_location)
                check_resumable(state, path)
            except Exception as e:  # a damaged file can fail in many ways inside torch.load
                reasons.append(f"  {path.name}: {first_line(e)}")
                continue
            for reason in reasons:
                print(f"skipping damaged checkpoint {reason.strip()}", file=sys.stderr, flush=True)
            return path, state
        if candidates:
            raise UserError(
                f"--resume auto: none of the {len(candidates)} checkpoint(s) in {self.folder} can be loaded; "
                "refusing to start over them (nothing was changed; move the folder away to start fresh)",
                *reasons,
            )
        return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (weights_only), check it is one and that its digest matches."""
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty (0 bytes)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a NeuroMF checkpoint")
    saved = state.pop(DIGEST_KEY, None)  # files of earlier versions have none: loaded unverified
    if saved is not None and saved != state_digest(state):
        raise ValueError(f"{path.name} fails its sha256 check (damaged content)")
    return state


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """A loaded checkpoint holds everything a resume reads, and finite weights (ValueError otherwise)."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path.name} lacks {', '.join(missing)}")
    for key in ("model_state_dict", "ema_state_dict"):
        for name, value in state[key].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{path.name}: {key}[{name}] holds NaN or Inf")
