"""Small real latent folders for the data tests: random (4, 16, 16, 16) tensors saved as .pt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPE = (4, 16, 16, 16)


def make_latent(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """A random latent with per-channel offsets and scales, so normalisation has something to do."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-4]
    mean = torch.arange(c, dtype=torch.float32).view(c, 1, 1, 1) - 1.5
    std = 0.5 + 0.25 * torch.arange(c, dtype=torch.float32).view(c, 1, 1, 1)
    return torch.randn(shape, generator=g) * std + mean


def write_latents(folder: Path, n: int, *, start: int = 0, prefix: str = "sub-") -> dict[str, torch.Tensor]:
    """n latent files named sub-000.pt, ...; returns name -> tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(start, start + n):
        name = f"{prefix}{i:03d}"
        out[name] = make_latent(i)
        torch.save(out[name], folder / f"{name}.pt")
    return out


def numpy_stats(tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-channel float64 statistics computed the plain numpy way."""
    x = np.stack([t.double().numpy() for t in tensors])  # (N, C, D, H, W)
    x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return {"mean": x.mean(axis=1), "std": x.std(axis=1), "min": x.min(axis=1), "max": x.max(axis=1)}


def write_stats_json(folder: Path, mean: Any, std: Any) -> Path:
    path = folder / "latent_stats.json"
    per = {f"channel_{c}": {"mean": float(m), "std": float(s)} for c, (m, s) in enumerate(zip(mean, std))}
    path.write_text(json.dumps({"per_channel": per, "n_files": 3}))
    return path


def longitudinal_metas(datasets: dict[str, int], seed: int = 0, first_subject: int = 0) -> list:
    """FOMO-style metadata: per dataset, subjects sub_NNN with 1-4 sessions each, named {dataset}_{subject}_{session}."""
    import random

    from neuromf.data.meta import LatentMeta

    rng = random.Random(f"{seed}")
    out = []
    for dataset, n_subjects in datasets.items():
        for s in range(first_subject, first_subject + n_subjects):
            subject = f"sub_{s:03d}"
            for k in range(1, rng.randint(1, 4) + 1):
                session = f"ses_{k}"
                out.append(
                    LatentMeta(
                        f"{dataset}_{subject}_{session}",
                        subject,
                        session,
                        dataset,
                        f"/raw/{dataset}/{subject}/{session}/t1.nii.gz",
                    )
                )
    return out


def write_longitudinal(
    folder: Path, metas: list, shape: tuple[int, ...] = (4, 8, 8, 8), with_metadata: bool = True
) -> None:
    """One upstream-style .pt per latent: {"z": tensor, "metadata": {...}} (or a plain tensor without metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(metas):
        z = make_latent(i, shape)
        obj = (
            {
                "z": z,
                "metadata": {
                    "subject_id": m.subject,
                    "session_id": m.session,
                    "dataset": m.dataset,
                    "source_path": m.source_path,
                    "latent_filename": f"{m.name}.pt",
                },
            }
            if with_metadata
            else z
        )
        torch.save(obj, folder / f"{m.name}.pt")


def write_upstream_shard(
    path: Path,
    metas: list,
    shape: tuple[int, ...] = (4, 8, 8, 8),
    unwritten: tuple[int, ...] = (),
    seed: int = 0,
    with_latents: bool = True,
) -> dict[str, torch.Tensor]:
    """An upstream encoder shard {dataset}.h5 in its published layout; slots in `unwritten` are left unwritten
    (written False, zeros). Returns name -> tensor of the written slots."""
    import h5py

    n = len(metas)
    written: dict[str, torch.Tensor] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if with_latents:
            ds = f.create_dataset("latents", shape=(n, *shape), dtype="float32", chunks=(1, *shape))
        flags = np.zeros(n, dtype=bool)
        for i, m in enumerate(metas):
            if i in unwritten:
                continue
            z = make_latent(seed * 1000 + i, shape)
            if with_latents:
                ds[i] = z.numpy()
            flags[i] = True
            written[m.name] = z
        f.create_dataset("written", data=flags)
        text = h5py.string_dtype("utf-8")
        for key, attr in (("subject_id", "subject"), ("session_id", "session"), ("source_path", "source_path")):
            f.create_dataset(key, data=np.array([getattr(m, attr) for m in metas], dtype=object), dtype=text)
        a = f.attrs
        a["dataset_name"] = metas[0].dataset if metas else path.stem
        a["n_volumes"], a["n_written"] = n, int(flags.sum())
        a["latent_shape"] = np.asarray(shape)
        a["dtype"], a["scale_factor"] = "float32", 0.96240234375
    return written
