"""Batches for training and validation: rows of a split wherever they live, a restorable shuffled order, flips.

A split's samples come from a `Rows` source: one tensor in memory (GPU or RAM),
chunk reads from the shard, or `.pt` files. `TrainBatches` draws fixed-shape,
normalised batches in an order that is a pure function of (seed, epoch,
position), so its whole state is a few integers. `ValBatches` walks the
validation split in a fixed order.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from neuromf.data.shard import ShardInfo, ShardReader
from neuromf.data.stats import LatentStats
from neuromf.errors import UserError
from neuromf.seeding import derived_seed

# ---------------------------------------------------------------- rows of a split


class Rows(Protocol):
    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """Samples idx (int64, CPU) of the split: (len(idx), C, D, H, W), stored dtype, on the CPU or the device."""

    def close(self) -> None: ...


class MemoryRows:
    """A whole split in one tensor (on the GPU or in RAM)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx.to(self.data.device, non_blocking=True)]  # on CPU ~6x faster than index_select

    def close(self) -> None:
        self.data = torch.empty(0)


class ShardRows:
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


ABSURD_STDS = 100.0  # a stored value this many channel stds from the channel mean is damage, not data


class GuardedRows:
    """Rows whose every fetched sample is checked: a non-finite value, or one further than ABSURD_STDS channel
    stds from the channel mean, is a UserError naming the latent (a damaged shard or file), not a NaN step."""

    def __init__(self, rows: Rows, names: Sequence[str], mean: np.ndarray, std: np.ndarray, where: str = "") -> None:
        self.rows, self.names, self.where = rows, list(names), where
        self.mean = torch.as_tensor(np.asarray(mean, np.float64), dtype=torch.float32)
        self.std = torch.as_tensor(np.asarray(std, np.float64), dtype=torch.float32)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.rows.fetch(idx)
        check_values(x, [self.names[i] for i in idx.tolist()], self.mean, self.std, self.where)
        return x

    def close(self) -> None:
        self.rows.close()


def check_values(x: torch.Tensor, names: Sequence[str], mean: torch.Tensor, std: torch.Tensor, where: str = "") -> None:
    """UserError naming the first latent of batch `x` (B, C, ...) with a non-finite or absurd value."""
    dims = tuple(d for d in range(x.dim()) if d != 1)
    xf = x.float()
    lo, hi = xf.amin(dim=dims), xf.amax(dim=dims)  # per channel
    m, s = mean.to(lo.device), std.to(lo.device)
    limit_lo, limit_hi = m - ABSURD_STDS * s, m + ABSURD_STDS * s
    if bool(torch.isfinite(lo).all() & torch.isfinite(hi).all() & (lo >= limit_lo).all() & (hi <= limit_hi).all()):
        return
    xf = x.detach().float().cpu()
    for b in range(xf.shape[0]):
        sample = xf[b]
        for c in range(sample.shape[0]):
            ch = sample[c]
            bad = ~torch.isfinite(ch) | (ch < float(limit_lo[c])) | (ch > float(limit_hi[c]))
            if bool(bad.any()):
                value = float(ch[bad][0])
                what = (
                    "a non-finite value"
                    if not math.isfinite(value)
                    else f"value {value:.4g}, {abs(value - float(m[c])) / float(s[c]):.3g} stds from the channel mean"
                )
                raise UserError(
                    f"latent {names[b]}{where}: {what} in channel {c} ({int(bad.sum())} such values; "
                    f"channel mean {float(m[c]):.4g}, std {float(s[c]):.4g}): the data are damaged; "
                    "check them (neuromf train --verify-data) or pack again"
                )


def load_whole(rows: Rows, n: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read a split once into one tensor on `device`, in blocks (no second full copy in RAM)."""
    out = torch.empty((n, *shape), dtype=dtype, device=device)
    block = 32
    for start in range(0, n, block):
        idx = torch.arange(start, min(n, start + block))
        out[start : start + len(idx)].copy_(rows.fetch(idx).to(dtype))
    return out


# ---------------------------------------------------------------- order


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derived_seed("perm", seed, epoch))
    return torch.randperm(n, generator=g)


def names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


class TrainBatches:
    """Shuffled training batches, drop_last, normalised, on the device, with an exactly restorable order.

    Epoch e visits the training set in the permutation seeded by (seed, e). With
    world_size > 1 every rank shares that permutation; global batch p of epoch e
    is positions [p * B * W, (p + 1) * B * W) and rank r takes its r-th block of B.
    Flips (flip_lr) mirror spatial axis `flip_axis` (data.flip_axis; its default 0 = D is left-right for RAS-ordered
    latents) and are drawn from a generator seeded by (seed, epoch, position),
    so they too follow from the state. `position` counts the batches already
    delivered in `epoch`; the call after an epoch's last batch starts the next epoch.
    """

    def __init__(
        self,
        rows: Rows,
        n: int,
        batch_size: int,
        stats: LatentStats,
        device: torch.device,
        *,
        seed: int,
        flip_lr: bool = False,
        flip_axis: int,  # no default here: the run-spec's data.flip_axis is the one
        rank: int = 0,
        world_size: int = 1,
        names_digest: str = "",
        prefetch: int = 0,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} / world_size {world_size}")
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise UserError(
                f"training.batch_size: the training split has {n} latents, fewer than one batch of "
                f"{batch_size} x {world_size} GPU(s)"
            )
        self.batch_size, self.n, self.rank, self.world_size = batch_size, n, rank, world_size
        self.seed, self.flip_lr, self.flip_axis = seed, flip_lr, flip_axis
        self.epoch, self.position = 0, 0
        self._rows, self._stats, self._device = rows, stats.to(device), torch.device(device)
        self.names_digest, self._prefetch_depth = names_digest, prefetch
        self._prefetcher: _Prefetcher | None = None

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
            g = torch.Generator().manual_seed(derived_seed("flip", self.seed, epoch, position))
            flips = torch.rand(self.batch_size * self.world_size, generator=g) < 0.5
            mask = flips[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            mask = mask.to(self._device, non_blocking=True).view(-1, 1, 1, 1, 1)
            x = torch.where(mask, x.flip(2 + self.flip_axis), x)
        return x

    def state_dict(self) -> dict:
        """Small, plain state: restoring it makes the next batches exactly those that would have come."""
        return {
            "version": 1,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "names": self.names_digest,
            "flip_lr": self.flip_lr,
            "flip_axis": self.flip_axis,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved order; UserError when it belongs to another training set or global batch.

        The order is defined over GLOBAL batches (position p = global batch p), so a run saved by W processes
        of batch B continues in W' processes of B' whenever B * W == B' * W'.
        """
        for key in ("n", "names"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(
                    f"cannot resume the data order: {key} was {state.get(key)!r}, now {self.state_dict()[key]!r}"
                )
        saved = int(state.get("batch_size", 0)) * int(state.get("world_size", 1))
        if saved != self.batch_size * self.world_size:
            raise UserError(
                f"cannot resume the data order: training.batch_size was {saved}, now {self.batch_size * self.world_size} "
                f"(the global batch: {state.get('batch_size')} x {state.get('world_size', 1)} process(es) then, "
                f"{self.batch_size} x {self.world_size} now)"
            )
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

    def __init__(self, rows: Rows, plan: Iterator[tuple[int, int, torch.Tensor]], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(rows, plan), name="neuromf-prefetch", daemon=True)
        self._thread.start()

    def _work(self, rows: Rows, plan: Iterator[tuple[int, int, torch.Tensor]]) -> None:
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

    def __init__(
        self,
        rows: Rows,
        n: int,
        batch_size: int,
        stats: LatentStats,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._idx = torch.arange(n)[rank::world_size]
        self.batch_size, self._rows, self._stats, self._device = (
            batch_size,
            rows,
            stats.to(device),
            torch.device(device),
        )

    @property
    def n_samples(self) -> int:
        return len(self._idx)

    def __len__(self) -> int:
        return -(-len(self._idx) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _, x in self.numbered():
            yield x

    def numbered(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """(j, batch j) for the batches j = rank, rank + world_size, ...: DDP validation shards whole batches,
        so batch j (and randomness tied to j) is the same whatever the number of processes."""
        for j, start in enumerate(range(0, len(self._idx), self.batch_size)):
            if j % world_size == rank:
                x = self._rows.fetch(self._idx[start : start + self.batch_size])
                yield j, self._stats.normalise_(x.to(self._device, non_blocking=True).float())
