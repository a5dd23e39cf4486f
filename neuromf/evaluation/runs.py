"""Finding a run's checkpoint, rebuilding its run-spec and networks, and the statistics to de-normalise with.

Everything a user can get wrong here (a folder that is not a run, a file that
is not a NeuroMF checkpoint, a checkpoint whose run-spec or weights no longer
fit this version's network) is a UserError naming the path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from neuromf.errors import UserError
from neuromf.spec.renamed import upgrade_saved_config
from neuromf.spec.schema import RunSpec

Weights = Literal["ema", "online"]

__all__ = [
    "LoadedCheckpoint",
    "Weights",
    "find_checkpoint",
    "is_run_dir",
    "latent_stats_for",
    "load_for_eval",
    "read_log",
]

# evaluate/verify use the best EMA checkpoint when there is one, else the newest state of the run.
_PREFERENCE = ("best.pt", "latest.pt", "latest.prev.pt")


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint with its rebuilt run-spec (paths.run_dir set to where the run really is)."""

    path: Path
    run_dir: Path
    spec: RunSpec
    state: dict[str, Any]

    @property
    def global_step(self) -> int:
        return int(self.state.get("global_step", 0))

    @property
    def epoch(self) -> int:
        return int(self.state.get("epoch", 0))

    def network(self, weights: Weights, device: torch.device | str = "cpu") -> nn.Module:
        """The network with the online or the EMA weights, in eval mode, without gradients."""
        from neuromf.model.state_fit import load_fitting
        from neuromf.model.unet import build_network

        net = build_network(self.spec.model)
        load_fitting(
            net,
            self.state["model_state_dict"],
            f"{self.path}: model_state_dict",
            "the network of its run-spec",
            hint="the checkpoint does not match its own model section (made by an incompatible version?)",
        )
        if weights == "ema":
            ema = self.state.get("ema_state_dict")
            if not isinstance(ema, dict):
                raise UserError(f"{self.path}: holds no EMA weights (ema_state_dict)")
            # The EMA covers the floating-point entries; anything else stays as in the online model.
            load_fitting(net, ema, f"{self.path}: ema_state_dict", "the network of its run-spec", allow_missing=True)
        return net.to(device).eval().requires_grad_(False)


def is_run_dir(path: Path) -> bool:
    """A run folder has a training log or a checkpoints/ folder with at least one .pt file."""
    path = Path(path)
    return path.is_dir() and ((path / "training_log.jsonl").is_file() or any((path / "checkpoints").glob("*.pt")))


def find_checkpoint(target: Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for a run folder (best.pt, else latest.pt, else the newest .pt) or a file."""
    target = Path(target)
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        return target, run_dir
    if not target.exists():
        raise UserError(f"{target}: no such file or folder")
    if not is_run_dir(target):
        raise UserError(f"{target}: not a NeuroMF run folder (no training_log.jsonl and no checkpoints/*.pt)")
    folder = target / "checkpoints"
    for name in _PREFERENCE:
        if (folder / name).is_file():
            return folder / name, target
    others = sorted((p for p in folder.glob("*.pt") if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime_ns)
    if not others:
        raise UserError(f"{target}: has no checkpoint yet (checkpoints/ is empty or missing)")
    return others[-1], target


def load_for_eval(target: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Find and load a checkpoint, validate its run-spec and check that its weights fit the network it names."""
    from pydantic import ValidationError

    from neuromf.train.checkpoint import load_checkpoint

    path, run_dir = find_checkpoint(target)
    try:
        state = load_checkpoint(path, map_location)
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # torch.load fails in many ways on a damaged or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: cannot be loaded as a NeuroMF checkpoint ({type(e).__name__}: {first})") from None
    config = state.get("config")
    if not isinstance(config, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: lacks the run-spec ('config') or the weights ('model_state_dict')")
    try:
        spec = RunSpec.model_validate(upgrade_saved_config(config))
    except ValidationError as e:
        problems = [
            f"{path}: its run-spec does not validate with this version: {'.'.join(map(str, err['loc']))}: {err['msg']}"
            for err in e.errors()
        ]
        raise UserError(*problems) from None
    _follow_moved_run(spec, run_dir.resolve())
    loaded = LoadedCheckpoint(path=path, run_dir=run_dir, spec=spec, state=state)
    loaded.network("online")  # fail now, with the key list, if the weights do not fit the network
    return loaded


def _follow_moved_run(spec: RunSpec, run_dir: Path) -> None:
    """Point the spec at the run folder where it is now; data paths that were inside the old folder move with it."""
    old = Path(spec.paths.run_dir)
    spec.paths.run_dir = run_dir
    if old == run_dir:
        return
    for key in ("shard", "latent_dir", "stats_file"):
        value = getattr(spec.data, key)
        if value is not None and Path(value).is_relative_to(old):
            setattr(spec.data, key, run_dir / Path(value).relative_to(old))


def latent_stats_for(loaded: LoadedCheckpoint) -> Any:
    """The LatentStats the run normalised with, found the way the trainer found them, without loading the data.

    A checkpoint that stores them ("latent_stats") is used as is; otherwise the shard's attributes or
    latent_stats.json, as the run-spec's data section says.
    """
    from neuromf.data.latents import stats_file_beside
    from neuromf.data.prepare import default_shard_path, ensure_shard, latent_source_dir
    from neuromf.data.shard import read_shard_info
    from neuromf.data.stats import LatentStats

    spec, state = loaded.spec, loaded.state
    channels = spec.model.in_channels
    if isinstance(state.get("latent_stats"), dict):
        return LatentStats.from_state_dict(state["latent_stats"])
    d = spec.data
    if not d.normalise:
        return LatentStats.identity(channels)
    if d.stats == "file":
        path = d.stats_file if d.stats_file is not None else stats_file_beside(latent_source_dir(spec))
        stats = LatentStats.from_json(path)
    elif d.source in ("shard", "demo"):
        shard = default_shard_path(spec)
        info = read_shard_info(shard if shard.exists() else ensure_shard(spec))
        stats = LatentStats(info.mean, info.std)
    else:  # source 'folder' with statistics computed from the files: the same scan the trainer did
        from neuromf.data.scan import scan_latents

        scan = scan_latents(d.latent_dir)
        if scan.stats is None:
            scan.raise_if_bad()
        stats = LatentStats(scan.stats.mean, scan.stats.std)
    if stats.channels != channels:
        raise UserError(f"latent statistics have {stats.channels} channels, the model {channels}")
    return stats


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The records of training_log.jsonl (or, failing that, training_log.json), in file order."""
    run_dir = Path(run_dir)
    jsonl, summary = run_dir / "training_log.jsonl", run_dir / "training_log.json"
    records: list[dict[str, Any]] = []
    if jsonl.is_file():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(record, dict):
                records.append(record)
        return records
    if summary.is_file():
        try:
            grouped = json.loads(summary.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{summary}: not valid JSON ({e.msg})") from None
        for kind in ("train", "val", "events"):
            records.extend(grouped.get(kind, []))
        records.sort(key=lambda r: (r.get("step", 0), r.get("time", 0)))
    return records
