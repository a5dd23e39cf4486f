"""Before a run touches anything: lock the run folder, tidy killed writes, pick and check the checkpoint.

Everything here happens before the demo set is built or the shard packed, so a
refused start or resume (another trainer holds the folder, every checkpoint is
damaged, the checkpoint belongs to another model or training set) changes
nothing on disk.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from neuromf.atomic import remove_stale_temporaries
from neuromf.errors import UserError
from neuromf.spec.renamed import upgrade_saved_config
from neuromf.spec.schema import RunSpec
from neuromf.train.checkpoint import CheckpointDir, check_resumable, first_line, load_checkpoint
from neuromf.train.distributed import Dist
from neuromf.train.lock import RunLock

# data.* keys that define the training set: a checkpoint continues only on the set it was trained on.
DATA_IDENTITY = ("source", "val_fraction", "split_seed", "demo")


def claim_run_folder(
    spec: RunSpec, checkpoints: CheckpointDir, resuming: bool, dist: Dist, dry_run: bool = False
) -> RunLock | None:
    """Rank 0: lock the run folder, remove temporaries of killed writes, and refuse a fresh start over checkpoints."""
    lock: RunLock | None = None
    with dist.main_first("locking the run folder"):
        if dist.is_main:
            lock = RunLock.acquire(spec.paths.run_dir)  # also the check that the run folder is writable
            for sub in ("checkpoints", "samples"):
                folder = spec.paths.run_dir / sub
                if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                    lock.release()
                    raise UserError(f"paths.run_dir: {folder} is not writable; nothing was changed")
            existing = checkpoints.resume_candidates() + [p for p in [checkpoints.staged] if p.exists()]
            if existing and not resuming:
                lock.release()
                instead = (
                    "a dry run would reset its training log: dry-run into a new paths.run_dir"
                    if dry_run
                    else "continue it with --resume auto, or use a new paths.run_dir"
                )
                raise UserError(
                    f"paths.run_dir: {spec.paths.run_dir} already holds checkpoints "
                    f"({', '.join(p.name for p in existing)}); {instead} (nothing was changed)"
                )
            for path in remove_stale_temporaries(spec.paths.run_dir):
                print(f"removed {path} (left by a killed write)", file=sys.stderr)
            checkpoints.recover_staged()
    return lock


def load_resume_state(
    resume: str, checkpoints: CheckpointDir, dist: Dist, device: torch.device
) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) to continue from, or None (auto, and no checkpoint at all). UserError for a bad --resume PATH."""
    if resume != "auto":
        return Path(resume), load_named(Path(resume), device)
    found: tuple[Path, dict[str, Any]] | None = None
    with dist.main_first("finding the checkpoint to resume from"):
        if dist.is_main:
            found = checkpoints.load_newest(device)  # UserError when checkpoints exist and none loads
    chosen = dist.broadcast(None if found is None else str(found[0]), "agreeing on the checkpoint to resume from")
    if chosen is None:
        if dist.is_main:
            print("no checkpoint to resume from: starting fresh")
        return None
    return found if found is not None else (Path(chosen), load_named(Path(chosen), device))


def load_named(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint given by name: one line (exit 2) if it is missing or damaged, never a fallback."""
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist")
    try:
        state = load_checkpoint(path, device)
        check_resumable(state, path)
    except Exception as e:  # torch.load fails in many ways on a damaged file
        raise UserError(f"--resume: {path} cannot be loaded ({first_line(e)})") from None
    return state


def check_compatible(spec: RunSpec, path: Path, state: dict[str, Any]) -> None:
    """The checkpoint belongs to this model and training set (checked before any data is built or packed)."""
    config = upgrade_saved_config(state["config"])
    if config["model"] != spec.model.model_dump(mode="json"):
        raise UserError(f"--resume: {path} was trained with a different model section; start a new run_dir")
    old, new = config.get("data", {}), spec.data.model_dump(mode="json")
    for key in DATA_IDENTITY:
        if key in old and old[key] != new.get(key):
            raise UserError(
                f"--resume: {path} was trained with data.{key} = {old[key]!r}, now {new.get(key)!r}: another "
                "training set; start a new paths.run_dir (nothing was changed)"
            )
    _check_latent_folder(spec, path, state)


def _check_latent_folder(spec: RunSpec, path: Path, state: dict[str, Any]) -> None:
    """Refuse before repacking when the latent folder now holds another set of names than the checkpoint's."""
    from neuromf.data.batches import names_digest
    from neuromf.data.prepare import default_shard_path
    from neuromf.data.scan import folder_metas
    from neuromf.data.shard import read_shard_info
    from neuromf.data.sources import list_source_files, source_fingerprint
    from neuromf.data.split import split_subjects

    d = spec.data
    if d.source != "shard" or d.latent_dir is None or not d.latent_dir.is_dir():
        return
    files = list_source_files(d.latent_dir)
    shard = default_shard_path(spec)
    if shard.exists():
        try:
            if read_shard_info(shard).source_fingerprint == source_fingerprint(files):
                return  # the shard is current: it will not be repacked (the names it holds are checked later)
        except UserError:
            pass
    # The shard would be (re)packed: only if the training set stays the same (this reads each file's metadata).
    split = split_subjects(folder_metas(d.latent_dir), d.val_fraction, d.test_fraction, d.split_seed, d.subject_from)
    if names_digest(split.train) == state["data_state"].get("names"):
        return
    raise UserError(
        f"--resume: the latents in {d.latent_dir} ({len(files)} files) are not the training set {path} "
        "was trained on; repacking would replace it: start a new paths.run_dir (nothing was changed)"
    )
