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

import hashlib
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from neuromf.data.latents import latent_name, read_latent, scan_latents, stats_file_beside, warn
from neuromf.data.shard import ShardInfo, ShardReader, pack_latents, read_shard_info, shard_freshness
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


# ---------------------------------------------------------------- rows of a split


class _Rows(Protocol):
    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """Samples idx (int64, CPU) of the split: (len(idx), C, D, H, W), stored dtype, on the CPU or the device."""

    def close(self) -> None: ...


class _MemoryRows:
    """A whole split in one tensor (on the GPU or in RAM)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx.to(self.data.device, non_blocking=True)]  # on CPU ~6x faster than index_select

    def close(self) -> None:
        self.data = torch.empty(0)


class _ShardRows:
    """Samples of a split read from the shard on demand; one HDF5 handle per thread."""

    def __init__(self, info: ShardInfo, rows: np.ndarray) -> None:
        self.info, self.rows = info, rows
        self._local = threading.local()
        self._readers: list[ShardReader] = []

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = ShardReader(self.info)
            self._readers.append(reader)
        return reader.read(self.rows[idx.numpy()])

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class _FolderRows:
    """Samples of a split read from their .pt files on demand (source 'folder', residency 'stream')."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([read_latent(self.files[i]).float() for i in idx.tolist()])

    def close(self) -> None:
        pass


def _load_whole(rows: _Rows, n: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read a split once into one tensor on `device`, in blocks (no second full copy in RAM)."""
    out = torch.empty((n, *shape), dtype=dtype, device=device)
    block = 32
    for start in range(0, n, block):
        idx = torch.arange(start, min(n, start + block))
        out[start : start + len(idx)].copy_(rows.fetch(idx).to(dtype))
    return out


# ---------------------------------------------------------------- order


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: independent streams per (seed, epoch, ...), not consecutive seeds."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed("perm", seed, epoch))
    return torch.randperm(n, generator=g)


def _names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


class TrainBatches:
    """Shuffled training batches, drop_last, normalised, on the device, with an exactly restorable order.

    Epoch e visits the training set in the permutation seeded by (seed, e). With
    world_size > 1 every rank shares that permutation; global batch p of epoch e
    is positions [p * B * W, (p + 1) * B * W) and rank r takes its r-th block of B.
    Flips (flip_lr) are drawn from a generator seeded by (seed, epoch, position),
    so they too follow from the state. `position` counts the batches already
    delivered in `epoch`; the call after an epoch's last batch starts the next epoch.
    """

    def __init__(
        self,
        rows: _Rows,
        n: int,
        batch_size: int,
        stats: LatentStats,
        device: torch.device,
        *,
        seed: int,
        flip_lr: bool = False,
        flip_axis: int = 2,
        rank: int = 0,
        world_size: int = 1,
        names_digest: str = "",
        prefetch: int = 0,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} / world_size {world_size}")
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise UserError(f"training.batch_size: the training split has {n} latents, fewer than one batch of "
                            f"{batch_size} x {world_size} GPU(s)")
        self.batch_size, self.n, self.rank, self.world_size = batch_size, n, rank, world_size
        self.seed, self.flip_lr, self.flip_axis = seed, flip_lr, flip_axis
        self.epoch, self.position = 0, 0
        self._rows, self._stats, self._device = rows, stats.to(device), torch.device(device)
        self._names_digest, self._prefetch_depth = names_digest, prefetch
        self._prefetcher: Optional[_Prefetcher] = None

    def _indices(self, epoch: int, position: int) -> torch.Tensor:
        g = self.batch_size * self.world_size
        start = position * g + self.rank * self.batch_size
        return _permutation(self.seed, epoch, self.n)[start : start + self.batch_size]

    def _plan(self, epoch: int, position: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        while True:
            if position >= self.steps_per_epoch:
                epoch, position = epoch + 1, 0
            yield epoch, position, self._indices(epoch, position)
            position += 1

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, C, D, H, W) float32 batch, normalised, flipped if asked, on the device."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        epoch, position = self.epoch, self.position
        if self._prefetch_depth > 0:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._rows, self._plan(epoch, position), self._prefetch_depth)
            got_epoch, got_position, x = self._prefetcher.get()
            assert (got_epoch, got_position) == (epoch, position), "prefetch out of step"
        else:
            x = self._rows.fetch(self._indices(epoch, position))
        self.position += 1
        # x is a fresh tensor (gathered or read), so normalising in place is safe.
        x = self._stats.normalise_(x.to(self._device, non_blocking=True).float())
        if self.flip_lr:
            g = torch.Generator().manual_seed(_derive_seed("flip", self.seed, epoch, position))
            flips = torch.rand(self.batch_size * self.world_size, generator=g) < 0.5
            mask = flips[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            mask = mask.to(self._device, non_blocking=True).view(-1, 1, 1, 1, 1)
            x = torch.where(mask, x.flip(2 + self.flip_axis), x)
        return x

    def state_dict(self) -> dict:
        """Small, plain state: restoring it makes the next batches exactly those that would have come."""
        return {
            "version": 1, "seed": self.seed, "epoch": self.epoch, "position": self.position, "n": self.n,
            "batch_size": self.batch_size, "world_size": self.world_size, "names": self._names_digest,
            "flip_lr": self.flip_lr, "flip_axis": self.flip_axis,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved order; UserError when it belongs to another training set or batching."""
        for key in ("n", "names", "batch_size", "world_size"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(f"cannot resume the data order: {key} was {state.get(key)!r}, now {self.state_dict()[key]!r}")
        self.close()
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self.flip_lr, self.flip_axis = bool(state["flip_lr"]), int(state["flip_axis"])

    def __del__(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher._stop.set()  # let the daemon thread end; no join in a finaliser

    def close(self) -> None:
        """Stop the prefetch thread, if any (the data stay)."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None


class _Prefetcher:
    """Reads planned batches ahead in one background thread (stream residency), in order."""

    def __init__(self, rows: _Rows, plan: Iterator[tuple[int, int, torch.Tensor]], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(rows, plan), name="neuromf-prefetch", daemon=True)
        self._thread.start()

    def _work(self, rows: _Rows, plan: Iterator[tuple[int, int, torch.Tensor]]) -> None:
        for epoch, position, idx in plan:
            try:
                item: object = (epoch, position, rows.fetch(idx))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def get(self) -> tuple[int, int, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class ValBatches:
    """The validation split in a fixed order (sorted names), no shuffle, last batch partial; normalised."""

    def __init__(self, rows: _Rows, n: int, batch_size: int, stats: LatentStats, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        self._idx = torch.arange(n)[rank::world_size]
        self.batch_size, self._rows, self._stats, self._device = batch_size, rows, stats.to(device), torch.device(device)

    @property
    def n_samples(self) -> int:
        return len(self._idx)

    def __len__(self) -> int:
        return -(-len(self._idx) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self._idx), self.batch_size):
            x = self._rows.fetch(self._idx[start : start + self.batch_size])
            yield self._stats.normalise_(x.to(self._device, non_blocking=True).float())


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
    _train: _Rows = field(default=None, repr=False)  # type: ignore[assignment]
    _val: _Rows = field(default=None, repr=False)  # type: ignore[assignment]

    def train_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> TrainBatches:
        """Shuffled, drop_last batches of `batch_size` per rank (see TrainBatches)."""
        return TrainBatches(
            self._train, len(self.train_names), batch_size, self.stats, self.device, seed=self.seed,
            flip_lr=self.flip_lr, flip_axis=self.flip_axis, rank=rank, world_size=world_size,
            names_digest=_names_digest(self.train_names), prefetch=2 if self.residency == "stream" else 0,
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


def prepare_data(spec: RunSpec, device: torch.device | str, *, pack: bool = True, progress: bool = True) -> LatentData:
    """Find, split, normalise and place the latents of a run-spec (see the module docstring).

    pack=False skips packing a missing or stale shard (other DDP ranks, after
    rank 0 ran `ensure_shard`).
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
    residency = choose_residency(d.residency, (len(train_names) + len(val_names)) * sample_bytes, device)

    def rows_of(split: list[str]) -> _Rows:
        if shard is not None:
            where = {name: i for i, name in enumerate(names)}
            lazy: _Rows = _ShardRows(info, np.array([where[s] for s in split], dtype=np.int64))
        else:
            lazy = _FolderRows([files[s] for s in split])
        if residency == "stream":
            return lazy
        whole = _load_whole(lazy, len(split), shape, dtype, device if residency == "device" else torch.device("cpu"))
        lazy.close()
        return _MemoryRows(whole)

    return LatentData(
        train_names=train_names, val_names=val_names, stats=stats.to(device), shape=tuple(shape),  # type: ignore[arg-type]
        residency=residency, device=device, shard=shard, seed=spec.training.seed, flip_lr=d.flip_lr,
        flip_axis=d.flip_axis, _train=rows_of(train_names), _val=rows_of(val_names),
    )
