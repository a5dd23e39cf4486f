"""The batch source the trainer uses: split, normalise, keep the data where it is fastest, and resume exactly.

`prepare_data(spec, device)` finds the latents (packing the shard when missing
or stale), splits them by subject into train/val/test (split.py), checks
latent_stats.json against the data, picks the statistics and the residency,
and returns a `LatentData`. Its `train_batches(batch_size)` gives fixed-shape,
normalised batches on the device in an order that is a pure function of
(training seed, epoch, position): the state to save for exact resume is three
integers. `val_batches(batch_size)` and `test_batches(batch_size)` iterate the
held-out sets in a fixed order (the test split is read from disk only when asked).

Residency: "device" and "host" load the split once into one tensor (on the GPU,
or in RAM) and draw batches by index (no workers, no per-step file I/O);
"stream" reads one chunk per sample from the shard in a background thread with
its own read-only HDF5 handle; "auto" picks device, then host, when the data fit.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neuromf.data.batches import (
    GuardedRows,
    MemoryRows,
    Rows,
    ShardRows,
    TrainBatches,
    ValBatches,
    load_whole,
    names_digest,
)
from neuromf.data.latents import stats_file_beside, warn
from neuromf.data.pack import pack_latents
from neuromf.data.scan import read_item, scan_latents
from neuromf.data.shard import read_shard_info, shard_freshness
from neuromf.data.split import Split, split_subjects
from neuromf.data.stats import REFUSE_RTOL, LatentStats, compare_stats_file
from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = [
    "LatentData",
    "LatentStats",
    "TrainBatches",
    "ValBatches",
    "available_host_memory",
    "choose_residency",
    "default_shard_path",
    "ensure_shard",
    "latent_source_dir",
    "prepare_data",
    "check_run_data",
]

DEVICE_FRACTION = 0.25  # data may take this share of free GPU memory; the rest is for model, optimizer, activations
HOST_FRACTION = 0.5  # and this share of available RAM


# ---------------------------------------------------------------- where the data are


def default_shard_path(spec: RunSpec) -> Path:
    """data.shard, or <paths.run_dir>/data/latents.h5."""
    return spec.data.shard if spec.data.shard is not None else spec.paths.run_dir / "data" / "latents.h5"


def latent_source_dir(spec: RunSpec) -> Path:
    """The folder of latents (.pt files and/or upstream .h5 shards): data.latent_dir, or the demo set (built when absent) for source 'demo'."""
    if spec.data.source == "demo":
        from neuromf.data.demo import ensure_demo_dataset

        return Path(ensure_demo_dataset(spec))
    if spec.data.latent_dir is None:
        raise UserError("data.latent_dir: not set; it is the folder of latents to pack")
    return spec.data.latent_dir


def ensure_shard(spec: RunSpec, progress: bool = True) -> Path:
    """The shard path, packed first when it is missing or stale (its sources changed). Call on one rank only."""
    shard = default_shard_path(spec)
    if spec.data.source == "shard" and spec.data.latent_dir is None:
        if not shard.exists():
            raise UserError(f"data.shard: {shard} does not exist, and data.latent_dir is not set to pack it from")
        return shard
    src = latent_source_dir(spec)
    if shard.is_file() and _foreign_hdf5(shard):
        raise UserError(
            f"data.shard: {shard} exists and is not a NeuroMF shard (an upstream encoder shard?); "
            "refusing to overwrite it: point data.shard at a new file and data.latent_dir at the sources"
        )
    if not src.is_dir() and shard.exists():
        warn(f"{src} is not there; using {shard} without checking that it is up to date")
        return shard
    fresh, why = shard_freshness(shard, src)
    if not fresh:
        print(f"packing {src} into {shard}: {why}", file=sys.stderr, flush=True)
        # latent_stats.json is compared with the data once, by prepare_data, not here too
        pack_latents(src, shard, scale_factor=spec.vae.scale_factor, check_stats=False, progress=progress)
    return shard


def _foreign_hdf5(path: Path) -> bool:
    """A readable HDF5 file without NeuroMF's format attribute (packing over it would destroy someone's data)."""
    import h5py

    from neuromf.data.upstream import is_neuromf_shard

    try:
        with h5py.File(path, "r", locking=False):
            pass
    except OSError:
        return False  # not HDF5 (e.g. a truncated shard): repacked as before
    return not is_neuromf_shard(path)


def available_host_memory() -> int:
    """Bytes of RAM this process can still use: MemAvailable, capped by a cgroup (SLURM job) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - usage)
    return max(0, avail)


def choose_residency(requested: str, nbytes: int, device: torch.device) -> str:
    """'device', 'host' or 'stream'. On a CPU device 'device' means 'host'. 'auto': the first that fits."""
    if requested == "device" and device.type != "cuda":
        requested = "host"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    host = available_host_memory()
    if requested != "auto":
        room = {"device": free, "host": host}.get(requested)
        if room is not None and nbytes > room:
            warn(
                f"data.residency {requested}: the data need {nbytes / 2**30:.1f} GiB but only {room / 2**30:.1f} GiB "
                "are free there; consider 'auto' or 'stream'"
            )
        return requested
    if device.type == "cuda" and nbytes <= DEVICE_FRACTION * free:
        return "device"
    return "host" if nbytes <= HOST_FRACTION * host else "stream"


# ---------------------------------------------------------------- everything together


@dataclass
class LatentData:
    """A prepared dataset: the split, the statistics, and where the samples live."""

    train_names: list[str]
    val_names: list[str]
    stats: LatentStats  # on `device`
    shape: tuple[int, int, int, int]  # (C, D, H, W)
    residency: str  # resolved: "device", "host" or "stream"
    device: torch.device
    shard: Path | None  # None for source 'folder'
    seed: int
    flip_axis: int  # data.flip_axis: the run-spec holds the one default
    flip_lr: bool = False
    test_names: list[str] = field(default_factory=list)
    split: Split | None = None
    _train: Rows = field(default=None, repr=False)  # type: ignore[assignment]
    _val: Rows = field(default=None, repr=False)  # type: ignore[assignment]
    _test: Rows | None = field(default=None, repr=False)  # streamed: read only when asked

    def train_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> TrainBatches:
        """Shuffled, drop_last batches of `batch_size` per rank (see TrainBatches)."""
        return TrainBatches(
            self._train,
            len(self.train_names),
            batch_size,
            self.stats,
            self.device,
            seed=self.seed,
            flip_lr=self.flip_lr,
            flip_axis=self.flip_axis,
            rank=rank,
            world_size=world_size,
            names_digest=names_digest(self.train_names),
            prefetch=2 if self.residency == "stream" else 0,
        )

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> ValBatches:
        """Validation batches in a fixed order; rank r gets every world_size-th sample."""
        return ValBatches(self._val, len(self.val_names), batch_size, self.stats, self.device, rank, world_size)

    def test_batches(self, batch_size: int) -> ValBatches:
        """The test split in a fixed order (sorted names), streamed from disk."""
        assert self._test is not None
        return ValBatches(self._test, len(self.test_names), batch_size, self.stats, self.device)

    def close(self) -> None:
        """Release the data (GPU/host memory, HDF5 handles)."""
        for rows in (self._train, self._val, self._test):
            if rows is not None:
                rows.close()


def _stats_file_of(spec: RunSpec) -> Path | None:
    d = spec.data
    if d.stats_file is not None:
        return d.stats_file
    if d.source == "demo" or d.latent_dir is not None:
        return stats_file_beside(latent_source_dir(spec))
    return None


def _stats_for(spec: RunSpec, computed: tuple[np.ndarray, np.ndarray], channels: int) -> LatentStats:
    d = spec.data
    if not d.normalise:
        return LatentStats.identity(channels)
    if d.stats == "shard":
        return LatentStats(*computed)
    path = _stats_file_of(spec)
    if path is None:
        raise UserError("data.stats_file: required with data.stats 'file' when data.latent_dir is not set")
    stats = LatentStats.from_json(path)
    if stats.channels != channels:
        raise UserError(f"{path}: has {stats.channels} channels, the latents have {channels}")
    return stats


def check_stats_file(
    spec: RunSpec, mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_latents: int, say: bool = True
) -> list[str]:
    """Compare latent_stats.json with the data's statistics: warn (once per line) beyond 2 % of the channel std;
    with data.stats 'file', refuse (UserError) beyond 10 % unless data.stats_mismatch is 'warn'."""
    path = _stats_file_of(spec)
    if path is None or not path.is_file():
        return []
    try:
        warnings, refusals = compare_stats_file(path, mean, std, lo, hi, n_latents)
    except UserError as e:
        if spec.data.stats == "file" and spec.data.normalise:
            raise
        warnings, refusals = list(e.problems), []
    if say:
        for line in warnings:
            warn(f"{path} disagrees with the data: {line}")
    d = spec.data
    if refusals and d.stats == "file" and d.normalise and d.stats_mismatch == "refuse":
        raise UserError(
            f"{path}: {refusals[0]}; beyond {100 * REFUSE_RTOL:.0f} % training would normalise with wrong "
            "statistics (data.stats: file): fix or remove the file, use data.stats: shard, or set "
            "data.stats_mismatch: warn"
        )
    return warnings


def prepare_data(
    spec: RunSpec,
    device: torch.device | str,
    *,
    pack: bool = True,
    progress: bool = True,
    residency: str | None = None,
    verify: str | None = None,
) -> LatentData:
    """Find, split, normalise and place the latents of a run-spec (see the module docstring).

    pack=False skips packing a missing or stale shard (other DDP ranks, after
    rank 0 ran `ensure_shard`); it also keeps warnings to rank 0. `residency`
    overrides data.residency (evaluation reads each latent about once: "stream").
    verify "once" / "always": check the shard's content checksum before reading
    it, once per shard file (recorded in the run folder) or every time.
    """
    d, device = spec.data, torch.device(device)
    shard: Path | None = None
    if d.source in ("shard", "demo"):
        shard = ensure_shard(spec, progress) if pack else default_shard_path(spec)
        if verify is not None:
            from neuromf.data.record import verify_shard_once

            verify_shard_once(spec.paths.run_dir, shard, force=verify == "always", progress=progress)
        info = read_shard_info(shard)
        names, metas, shape, dtype, sample_bytes = (
            info.names,
            info.metas,
            info.shape,
            info.torch_dtype,
            info.sample_bytes,
        )
        computed, lo, hi = (info.mean, info.std), info.min, info.max
        if info.metadata_from == "names" and pack:
            warn(
                f"{shard}: packed by an older neuromf, without per-latent metadata: subjects are parsed from the "
                "names (pack again to keep the sources' subject ids)"
            )
    else:
        scan = scan_latents(d.latent_dir, progress=progress)
        if scan.bad:
            scan.raise_if_bad()
        assert scan.stats is not None and scan.shape is not None
        names, metas, shape, dtype = scan.names, scan.metas, scan.shape, torch.float32
        sample_bytes = int(np.prod(shape)) * 4
        computed, lo, hi = (scan.stats.mean, scan.stats.std), scan.stats.min, scan.stats.max
        items = {item.name: item for item in scan.good}
    m = spec.model
    if shape[0] != m.in_channels or tuple(shape[1:]) != tuple(m.spatial_size):
        raise UserError(
            f"model.spatial_size: the latents are (C, D, H, W) = {list(shape)}, but the model takes "
            f"{m.in_channels} channels of {list(m.spatial_size)}"
        )
    check_stats_file(spec, computed[0], computed[1], lo, hi, len(names), say=pack)
    stats = _stats_for(spec, computed, shape[0])
    split = split_subjects(metas, d.val_fraction, d.test_fraction, d.split_seed, d.subject_from)
    if split.unmatched and pack and d.source != "demo":
        warn(
            f"{split.unmatched} of {len(names)} latent names match no subject pattern (data.subject_from); "
            "each of them is its own subject in the split"
        )
    train_names, val_names = split.train, split.val
    residency = choose_residency(residency or d.residency, (len(train_names) + len(val_names)) * sample_bytes, device)

    def lazy_rows(part: list[str]) -> Rows:
        if shard is not None:
            where = {name: i for i, name in enumerate(names)}
            lazy: Rows = ShardRows(info, np.array([where[s] for s in part], dtype=np.int64))
        else:
            lazy = FolderRows([items[s] for s in part])
        return GuardedRows(lazy, part, *computed, where=f" in {shard}" if shard is not None else "")

    def rows_of(part: list[str]) -> Rows:
        lazy = lazy_rows(part)
        if residency == "stream":
            return lazy
        whole = load_whole(lazy, len(part), shape, dtype, device if residency == "device" else torch.device("cpu"))
        lazy.close()
        return MemoryRows(whole)

    return LatentData(
        train_names=train_names,
        val_names=val_names,
        stats=stats.to(device),
        shape=tuple(shape),  # type: ignore[arg-type]
        residency=residency,
        device=device,
        shard=shard,
        seed=spec.training.seed,
        flip_lr=d.flip_lr,
        flip_axis=d.flip_axis,
        test_names=split.test,
        split=split,
        _train=rows_of(train_names),
        _val=rows_of(val_names),
        _test=lazy_rows(split.test),
    )


class FolderRows:
    """Samples of a split read from their sources on demand (source 'folder'): .pt files or upstream shard slots."""

    def __init__(self, items: list) -> None:
        self.items = list(items)
        self._handles: dict = {}

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([read_item(self.items[i], self._handles).float() for i in idx.tolist()])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def check_run_data(spec: RunSpec, data: LatentData, *, resume: str | None) -> None:
    """At the start of training (rank 0): write <run_dir>/split.json, refusing a resume (--resume PATH, or auto
    with checkpoints present) whose split changed."""
    from neuromf.data.record import record_split, split_record

    folder = spec.paths.run_dir / "checkpoints"
    resuming = resume is not None and (resume != "auto" or (folder.is_dir() and any(folder.glob("*.pt"))))

    if data.split is not None:
        d = spec.data
        record = split_record(
            data.split,
            seed=d.split_seed,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            subject_from=d.subject_from,
        )
        record_split(spec.paths.run_dir, record, resuming)
