"""The batch source the trainer uses: split, normalise, keep the data where it is fastest, and resume exactly.

`prepare_data(spec, device)` finds the latents (packing the shard when missing
or stale), splits the names, picks the statistics and the residency, and
returns a `LatentData`. Its `train_batches(batch_size)` gives fixed-shape,
normalised batches on the device in an order that is a pure function of
(training seed, epoch, position): the state to save for exact resume is three
integers. `val_batches(batch_size)` iterates the validation set in a fixed order.

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
from typing import Optional

import numpy as np
import torch

from neuromf.data.batches import FolderRows, MemoryRows, Rows, ShardRows, TrainBatches, ValBatches, load_whole, names_digest
from neuromf.data.latents import latent_name, scan_latents, stats_file_beside, warn
from neuromf.data.shard import pack_latents, read_shard_info, shard_freshness
from neuromf.data.split import split_names
from neuromf.data.stats import LatentStats
from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = [
    "LatentData", "LatentStats", "TrainBatches", "ValBatches", "available_host_memory", "choose_residency",
    "default_shard_path", "ensure_shard", "latent_source_dir", "prepare_data",
]

DEVICE_FRACTION = 0.25  # data may take this share of free GPU memory; the rest is for model, optimizer, activations
HOST_FRACTION = 0.5  # and this share of available RAM


# ---------------------------------------------------------------- where the data are


def default_shard_path(spec: RunSpec) -> Path:
    """data.shard, or <paths.run_dir>/data/latents.h5."""
    return spec.data.shard if spec.data.shard is not None else spec.paths.run_dir / "data" / "latents.h5"


def latent_source_dir(spec: RunSpec) -> Path:
    """The folder of .pt latents: data.latent_dir, or the demo set (built when absent) for source 'demo'."""
    if spec.data.source == "demo":
        from neuromf.data.demo import ensure_demo_dataset

        return Path(ensure_demo_dataset(spec))
    if spec.data.latent_dir is None:
        raise UserError("data.latent_dir: not set; it is the folder of .pt latents to pack")
    return spec.data.latent_dir


def ensure_shard(spec: RunSpec, progress: bool = True) -> Path:
    """The shard path, packed first when it is missing or stale (its sources changed). Call on one rank only."""
    shard = default_shard_path(spec)
    if spec.data.source == "shard" and spec.data.latent_dir is None:
        if not shard.exists():
            raise UserError(f"data.shard: {shard} does not exist, and data.latent_dir is not set to pack it from")
        return shard
    src = latent_source_dir(spec)
    if not src.is_dir() and shard.exists():
        warn(f"{src} is not there; using {shard} without checking that it is up to date")
        return shard
    fresh, why = shard_freshness(shard, src)
    if not fresh:
        print(f"packing {src} into {shard}: {why}", file=sys.stderr, flush=True)
        pack_latents(src, shard, scale_factor=spec.vae.scale_factor, stats_file=spec.data.stats_file, progress=progress)
    return shard


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
            warn(f"data.residency {requested}: the data need {nbytes / 2**30:.1f} GiB but only {room / 2**30:.1f} GiB "
                 "are free there; consider 'auto' or 'stream'")
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
    shard: Optional[Path]  # None for source 'folder'
    seed: int
    flip_lr: bool = False
    flip_axis: int = 2
    _train: Rows = field(default=None, repr=False)  # type: ignore[assignment]
    _val: Rows = field(default=None, repr=False)  # type: ignore[assignment]

    def train_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> TrainBatches:
        """Shuffled, drop_last batches of `batch_size` per rank (see TrainBatches)."""
        return TrainBatches(
            self._train, len(self.train_names), batch_size, self.stats, self.device, seed=self.seed,
            flip_lr=self.flip_lr, flip_axis=self.flip_axis, rank=rank, world_size=world_size,
            names_digest=names_digest(self.train_names), prefetch=2 if self.residency == "stream" else 0,
        )

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> ValBatches:
        """Validation batches in a fixed order; rank r gets every world_size-th sample."""
        return ValBatches(self._val, len(self.val_names), batch_size, self.stats, self.device, rank, world_size)

    def close(self) -> None:
        """Release the data (GPU/host memory, HDF5 handles)."""
        for rows in (self._train, self._val):
            if rows is not None:
                rows.close()


def _stats_for(spec: RunSpec, computed: tuple[np.ndarray, np.ndarray], channels: int) -> LatentStats:
    d = spec.data
    if not d.normalise:
        return LatentStats.identity(channels)
    if d.stats == "shard":
        return LatentStats(*computed)
    if d.stats_file is not None:
        path = d.stats_file
    elif d.source == "demo" or d.latent_dir is not None:
        path = stats_file_beside(latent_source_dir(spec))
    else:
        raise UserError("data.stats_file: required with data.stats 'file' when data.latent_dir is not set")
    stats = LatentStats.from_json(path)
    if stats.channels != channels:
        raise UserError(f"{path}: has {stats.channels} channels, the latents have {channels}")
    return stats


def prepare_data(
    spec: RunSpec, device: torch.device | str, *, pack: bool = True, progress: bool = True, residency: Optional[str] = None
) -> LatentData:
    """Find, split, normalise and place the latents of a run-spec (see the module docstring).

    pack=False skips packing a missing or stale shard (other DDP ranks, after
    rank 0 ran `ensure_shard`). `residency` overrides data.residency (evaluation
    reads each latent about once: "stream").
    """
    d, device = spec.data, torch.device(device)
    shard: Optional[Path] = None
    if d.source in ("shard", "demo"):
        shard = ensure_shard(spec, progress) if pack else default_shard_path(spec)
        info = read_shard_info(shard)
        names, shape, dtype, sample_bytes = info.names, info.shape, info.torch_dtype, info.sample_bytes
        computed = (info.mean, info.std)
    else:
        scan = scan_latents(d.latent_dir, progress=progress)
        if scan.bad:
            scan.raise_if_bad()
        assert scan.stats is not None and scan.shape is not None
        names, shape, dtype = scan.names, scan.shape, torch.float32
        sample_bytes = int(np.prod(shape)) * 4
        computed = (scan.stats.mean, scan.stats.std)
        files = {latent_name(p): p for p in scan.good}
    m = spec.model
    if shape[0] != m.in_channels or tuple(shape[1:]) != tuple(m.spatial_size):
        raise UserError(f"model.spatial_size: the latents are (C, D, H, W) = {list(shape)}, but the model takes "
                        f"{m.in_channels} channels of {list(m.spatial_size)}")
    stats = _stats_for(spec, computed, shape[0])
    train_names, val_names = split_names(names, d.val_fraction, d.split_seed)
    residency = choose_residency(residency or d.residency, (len(train_names) + len(val_names)) * sample_bytes, device)

    def rows_of(split: list[str]) -> Rows:
        if shard is not None:
            where = {name: i for i, name in enumerate(names)}
            lazy: Rows = ShardRows(info, np.array([where[s] for s in split], dtype=np.int64))
        else:
            lazy = FolderRows([files[s] for s in split])
        if residency == "stream":
            return lazy
        whole = load_whole(lazy, len(split), shape, dtype, device if residency == "device" else torch.device("cpu"))
        lazy.close()
        return MemoryRows(whole)

    return LatentData(
        train_names=train_names, val_names=val_names, stats=stats.to(device), shape=tuple(shape),  # type: ignore[arg-type]
        residency=residency, device=device, shard=shard, seed=spec.training.seed, flip_lr=d.flip_lr,
        flip_axis=d.flip_axis, _train=rows_of(train_names), _val=rows_of(val_names),
    )
