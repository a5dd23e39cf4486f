"""Checkpoints: complete-or-absent files, exact-resume state, finding the newest good one.

Layout under `<run_dir>/checkpoints/`:
  latest.pt        every `checkpoint.latest_every_n_steps`, at epoch ends and on stop signals
  latest.prev.pt   the one before (a fallback if latest.pt is ever damaged)
  epoch_NNNN.pt    every `checkpoint.save_every_n_epochs` (the last `keep_last` kept)
  best.pt          lowest validation MSE of the EMA weights

Every file holds the seed's section 15.5 fields (epoch, global_step, model_state_dict,
ema_state_dict, optimizer_state_dict, scheduler_state_dict, config, loss_history)
plus what exact resume needs: all RNG states and the data order. Only plain
containers and tensors are stored, so `torch.load(weights_only=True)` reads them.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from neuromf.atomic import atomic_open

FORMAT = "neuromf-checkpoint-v1"


# ---------------------------------------------------------------- RNG state


def capture_rng_states(extra: Optional[dict[str, torch.Generator]] = None) -> dict[str, Any]:
    """torch (CPU and CUDA), numpy, Python and named generators, as tensors and plain lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (extra or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any], extra: Optional[dict[str, torch.Generator]] = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (extra or {}).items():
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------- files


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """No NaN/Inf may ever reach a checkpoint."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RuntimeError(f"refusing to save a checkpoint: {what}[{key}] holds NaN or Inf")


class CheckpointDir:
    """Saving, rotating and finding checkpoints of one run."""

    def __init__(self, run_dir: Path, keep_last: int = 3) -> None:
        self.folder = run_dir / "checkpoints"
        self.keep_last = keep_last

    @property
    def latest(self) -> Path:
        return self.folder / "latest.pt"

    def save_latest(self, state: dict[str, Any]) -> Path:
        staged = self.folder / ".latest.staged.pt"
        atomic_torch_save(state, staged)
        if self.latest.exists():
            os.replace(self.latest, self.folder / "latest.prev.pt")
        os.replace(staged, self.latest)
        return self.latest

    def save_epoch(self, state: dict[str, Any], epoch: int) -> Path:
        path = self.folder / f"epoch_{epoch:04d}.pt"
        atomic_torch_save(state, path)
        for old in sorted(self.folder.glob("epoch_*.pt"))[: -self.keep_last]:
            old.unlink()
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        path = self.folder / "best.pt"
        atomic_torch_save(state, path)
        return path

    def resume_candidates(self) -> list[Path]:
        """Checkpoints a run can continue from, newest first (best.pt is for evaluation, not resume)."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.glob("*.pt") if not p.name.startswith(".") and p.name != "best.pt"]
        return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def load_newest(self, map_location: str | torch.device = "cpu") -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint that loads completely; damaged ones are skipped with a message."""
        for path in self.resume_candidates():
            try:
                return path, load_checkpoint(path, map_location)
            except Exception as e:  # a damaged file can fail in many ways inside torch.load
                print(f"skipping damaged checkpoint {path.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (weights_only) and check it is one."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a NeuroMF checkpoint")
    return state
