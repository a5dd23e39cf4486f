"""What a run records about its data in the run folder, and checks again on every start.

- `split.json`: the split the run trains on (names per split, subject counts,
  per-dataset counts, promotions). Written when training starts; a resume whose
  split would now differ is refused, saying what changed.
- `data/verified.json`: the shard's content checksum was recomputed and matched
  (with the shard's path, size and mtime): the ~2 GB read is done once per
  shard, again only when the file changes or `neuromf train --verify-data`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from neuromf.atomic import atomic_write_text
from neuromf.data.split import SPLITS, Split
from neuromf.errors import UserError

SPLIT_FILE = "split.json"
VERIFIED_FILE = Path("data") / "verified.json"


def split_record(
    split: Split, *, seed: int, val_fraction: float, test_fraction: float, subject_from: str
) -> dict[str, Any]:
    """The content of split.json."""
    return {
        "train": split.train,
        "val": split.val,
        "test": split.test,
        "subjects": {which: len(split.subjects(which)) for which in SPLITS},
        "latents": {which: len(split.names(which)) for which in SPLITS},
        "by_dataset": split.by_dataset(),
        "promoted": split.promoted,
        "names_without_subject": split.unmatched,
        "rule": {
            "split_seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "subject_from": subject_from,
        },
    }


def split_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str | None:
    """None when the names per split agree; else a short account: moved, new and gone latents (a few named)."""

    def place(record: dict[str, Any]) -> dict[str, str]:
        return {name: which for which in SPLITS for name in record.get(which, [])}

    before, after = place(old), place(new)
    if before == after:
        return None
    moved = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    added, gone = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    parts = []
    if moved:
        parts.append(
            f"{len(moved)} moved ("
            + ", ".join(f"{n}: {before[n]} -> {after[n]}" for n in moved[:limit])
            + (", ..." if len(moved) > limit else "")
            + ")"
        )
    if added:
        parts.append(f"{len(added)} new (" + ", ".join(added[:limit]) + (", ..." if len(added) > limit else "") + ")")
    if gone:
        parts.append(f"{len(gone)} gone (" + ", ".join(gone[:limit]) + (", ..." if len(gone) > limit else "") + ")")
    return "; ".join(parts)


def record_split(run_dir: Path, record: dict[str, Any], resuming: bool) -> Path:
    """Write <run_dir>/split.json; when `resuming`, first refuse (UserError) a split that differs from the recorded one."""
    path = Path(run_dir) / SPLIT_FILE
    if resuming and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({type(e).__name__}); restore it or start a new run_dir") from None
        changed = split_changes(old, record)
        if changed:
            raise UserError(
                f"{path}: the data split differs from the one this run was trained on: {changed}; "
                "restore the latents and data.* settings, or start a new paths.run_dir"
            )
        if old == record:
            return path
    _write(path, json.dumps(record, indent=1) + "\n")
    return path


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None


def verify_shard_once(run_dir: Path, shard: Path, force: bool = False, progress: bool = True) -> bool:
    """Recompute the shard's content checksum unless <run_dir>/data/verified.json says this very file (path, size,
    mtime, checksum) was verified; UserError (one line) on a mismatch. True when it was recomputed now."""
    from neuromf.data.shard import content_checksum, read_shard_info

    shard = Path(shard)
    info = read_shard_info(shard)
    st = shard.stat()
    identity = {
        "shard": str(shard.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "content_sha256": info.content_sha256,
    }
    record_path = Path(run_dir) / VERIFIED_FILE
    if not force and record_path.is_file():
        try:
            recorded = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = {}
        if all(recorded.get(k) == v for k, v in identity.items()):
            return False
    if progress:
        print(f"verifying {shard} ({st.st_size / 2**20:.0f} MiB): content checksum", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        actual = content_checksum(shard)
    except (OSError, KeyError) as e:  # a damaged chunk or header fails inside HDF5
        raise UserError(
            f"{shard}: damaged: its latents cannot be read ({' '.join(str(e).split())[:120]}); "
            "pack it again from the sources"
        ) from None
    if actual != info.content_sha256:
        raise UserError(
            f"{shard}: damaged: its latents' checksum is {actual[:16]}..., the shard says "
            f"{info.content_sha256[:16]}...; pack it again from the sources"
        )
    record = {
        **identity,
        "verified_s": round(time.perf_counter() - started, 2),
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write(record_path, json.dumps(record, indent=1) + "\n")
    return True
