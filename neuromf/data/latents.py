"""Reading `.pt` latents safely, checking them, and their per-channel statistics.

A latent file holds a floating tensor (C, D, H, W) or (1, C, D, H, W), or a
dict with one under "z", "latent" or "latents". Files are loaded with
`torch.load(weights_only=True)`, so a file can never run code. Every way a file
can be wrong becomes one line naming the file and the problem.

`ChannelStats` accumulates per-channel statistics in float64 (Chan's parallel
mean/variance merge, so nothing but a few numbers per file is kept in memory);
reading a whole folder is scan.py's.
"""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.errors import UserError

LATENT_KEYS = ("z", "latent", "latents")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATS_FILE = "latent_stats.json"


class LatentFileError(UserError):
    """One bad latent file: `path` and a one-line `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def warn(message: str) -> None:
    """A warning the user should see: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one file


def latent_name(path: Path) -> str:
    """The name a latent is known by (shard names, split): its file name without `.pt`."""
    return Path(path).name[: -len(".pt")] if str(path).endswith(".pt") else Path(path).name


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _refusal(e: BaseException) -> str:
    """The useful line of torch's long weights_only refusal message."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            line = rest[0]
            if line.startswith("Unsupported global: GLOBAL "):  # name the class, drop torch's advice
                return "it pickles " + line[len("Unsupported global: GLOBAL ") :].split(" ", 1)[0]
            return line[:160]
    return _short(e)


def check_latent(obj: Any, path: Path) -> torch.Tensor:
    """The (C, D, H, W) tensor inside a loaded object, or LatentFileError saying what is wrong."""
    if isinstance(obj, dict):
        key = next((k for k in LATENT_KEYS if k in obj), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise LatentFileError(path, f"a dict without any of the keys 'z', 'latent', 'latents' (keys: {keys})")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise LatentFileError(
            path, f"holds a {type(obj).__name__}, not a tensor or a dict with 'z', 'latent' or 'latents'"
        )
    if obj.dtype not in FLOAT_DTYPES:
        raise LatentFileError(path, f"dtype {str(obj.dtype).replace('torch.', '')} is not floating point")
    shape = tuple(obj.shape)
    if obj.dim() == 5 and shape[0] == 1:
        obj = obj[0]
    elif obj.dim() != 4:
        raise LatentFileError(
            path, f"shape {list(shape)} has rank {obj.dim()}; expected (C, D, H, W) or (1, C, D, H, W)"
        )
    if obj.numel() == 0:
        raise LatentFileError(path, f"shape {list(shape)} is empty")
    lo, hi = torch.aminmax(obj)  # NaN and Inf show in the extremes; ~100x faster than isfinite().all() on CPU
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        finite = torch.isfinite(obj)
        n_nan = int(torch.isnan(obj).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise LatentFileError(path, f"{n_nan} NaN and {n_inf} Inf values (of {obj.numel()})")
    return obj.contiguous()


def load_latent_bytes(data: bytes, path: Path) -> torch.Tensor:
    """Parse a `.pt` file's bytes safely (weights_only) into its checked (C, D, H, W) tensor."""
    return load_latent_and_meta(data, path)[0]


def load_latent_and_meta(data: bytes, path: Path) -> tuple[torch.Tensor, Any]:
    """(tensor, the dict's "metadata" entry or None): load_latent_bytes that keeps the upstream metadata."""
    if not data:
        raise LatentFileError(path, "unreadable or truncated (the file is empty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the checks below say what matters
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a broken file
        if "Weights only load failed" in str(e):
            raise LatentFileError(
                path, f"not a plain tensor file: safe loading (weights_only) refused it ({_refusal(e)})"
            ) from None
        raise LatentFileError(path, f"unreadable or truncated ({_short(e)})") from None
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return check_latent(obj, path), meta


def read_latent(path: Path) -> torch.Tensor:
    """Read and check one `.pt` latent: a (C, D, H, W) floating tensor in the file's dtype."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise LatentFileError(path, f"cannot read ({_short(e)})") from None
    return load_latent_bytes(data, path)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside: per-file ops are small, and thread-pool barriers cost more than they
    save (10-100x slower on a busy 2-core machine); the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- statistics


@dataclass
class ChannelStats:
    """Per-channel count, mean, sum of squared deviations (m2), min, max, all float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def of(cls, x: torch.Tensor) -> ChannelStats:
        """Statistics of one (C, ...) tensor, in float64."""
        flat = x.detach().to(torch.float64).reshape(x.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, correction=0)  # one fused pass (Welford), not four
        lo, hi = torch.aminmax(flat, dim=1)
        n = flat.shape[1]
        return cls(n, mean.numpy(), (var * n).numpy(), lo.numpy(), hi.numpy())

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Statistics of both sets together (Chan et al.), exact up to float64 rounding."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return ChannelStats(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof = 0, as numpy's default)."""
        return np.sqrt(self.m2 / self.count)


def read_stats_json(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from latent_stats.json: {"per_channel": {"channel_0": {"mean", "std"}, ...}}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read latent statistics ({_short(e)})") from None
    per = raw.get("per_channel") if isinstance(raw, dict) else None
    if not isinstance(per, dict) or not per:
        raise UserError(f'{path}: expected {{"per_channel": {{"channel_0": {{"mean": .., "std": ..}}, ..}}}}')
    means, stds = [], []
    for c in range(len(per)):
        entry = per.get(f"channel_{c}")
        if not isinstance(entry, dict):
            raise UserError(f"{path}: per_channel has no channel_{c} (channels must be numbered 0..{len(per) - 1})")
        try:
            mean, std = float(entry["mean"]), float(entry["std"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: per_channel.channel_{c} needs numeric 'mean' and 'std'") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise UserError(
                f"{path}: per_channel.channel_{c} has mean {mean} and std {std}; std must be finite and > 0"
            )
        means.append(mean)
        stds.append(std)
    return np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)


def compare_stats(
    file_mean: np.ndarray, file_std: np.ndarray, mean: np.ndarray, std: np.ndarray, rtol: float = 0.02
) -> list[str]:
    """Channels where latent_stats.json disagrees with computed statistics (mean off by > rtol * std, or std by > rtol)."""
    if len(file_mean) != len(mean):
        return [f"it has {len(file_mean)} channels, the latents have {len(mean)}"]
    problems = []
    for c in range(len(mean)):
        if abs(file_mean[c] - mean[c]) > rtol * std[c] or abs(file_std[c] - std[c]) > rtol * std[c]:
            problems.append(
                f"channel_{c}: file mean {file_mean[c]:.6g} std {file_std[c]:.6g}, computed mean {mean[c]:.6g} std {std[c]:.6g}"
            )
    return problems


def check_stats_file(path: Path, stats: ChannelStats) -> list[str]:
    """Warn (stderr) when latent_stats.json disagrees with the computed statistics; returns the disagreements."""
    if not Path(path).exists():
        return []
    try:
        file_mean, file_std = read_stats_json(path)
    except UserError as e:
        problems = list(e.problems)
    else:
        problems = compare_stats(file_mean, file_std, stats.mean, stats.std)
    for problem in problems:
        warn(f"{path} disagrees with the latents: {problem}" if not problem.startswith(str(path)) else problem)
    return problems


def stats_file_beside(folder: Path) -> Path:
    """Where the upstream encoder writes latent_stats.json."""
    return Path(folder) / STATS_FILE
