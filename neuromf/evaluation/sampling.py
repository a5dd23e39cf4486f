"""`neuromf sample`: N samples from a checkpoint, written as latents, decoded volumes and one PNG grid per NFE.

Layout of the output folder (label = "<weights>_nfe<k>", as in a run's samples/epoch_N/):

    <label>_latents.pt          de-normalised latents, float32 (N, C, D, H, W)
    <label>_grid.png            mid-sagittal/coronal/axial slices of the first `grid_n` samples
    <label>_sample_000.nii.gz   one decoded volume per sample (unless save_volumes is off)
    sample_info.json            checkpoint, step, seed, weights, NFEs, N

Samples are generated, de-normalised and decoded batch by batch; NIfTI files
are written as each batch is done, so memory holds one batch of volumes (plus
the latents, which go into one file at the end).
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.atomic import atomic_write_bytes, atomic_write_text
from neuromf.errors import UserError
from neuromf.evaluation.runs import LoadedCheckpoint, Weights

__all__ = ["write_samples", "GRID_N"]

GRID_N = 16  # rows of a grid; a 500-row PNG would be 80,000 pixels tall


def _check_memory(n: int, nfes: Sequence[int], loaded: LoadedCheckpoint) -> None:
    """N larger than possible: the latents of all NFEs are held until written; refuse what cannot fit in RAM."""
    from neuromf.data.prepare import available_host_memory

    per = 4 * loaded.spec.model.in_channels * int(np.prod(loaded.spec.model.spatial_size))
    need = n * len(nfes) * per
    room = available_host_memory() // 2
    if need > room:
        fit = max(1, room // (len(nfes) * per))
        raise UserError(
            f"--n {n}: larger than possible here: {n} x {len(nfes)} NFE latents need {need / 2**30:.1f} GiB of RAM, "
            f"{room / 2**30:.1f} GiB are free; use --n {fit} or less (several calls with different --seed give more)"
        )


def write_samples(
    loaded: LoadedCheckpoint,
    out_dir: Path,
    *,
    n: int,
    nfes: Sequence[int],
    weights: Weights = "ema",
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    grid_n: int = GRID_N,
    save_volumes: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, Path]]:
    """Generate and write the files above; returns {label: sample_paths(...)} for each NFE."""
    from tqdm import tqdm

    from neuromf.device import autocast_dtype
    from neuromf.evaluation.generate import generate_batches
    from neuromf.evaluation.jsonio import to_json
    from neuromf.evaluation.runs import latent_stats_for
    from neuromf.model.vae import decode_with, loaded_vae
    from neuromf.train.sample_files import nifti_bytes, sample_paths, volume_grid

    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    if not nfes or any(k < 1 for k in nfes):
        raise UserError(f"--nfe: every NFE must be >= 1, got {list(nfes)}")
    _check_memory(n, nfes, loaded)
    spec, device = loaded.spec, torch.device(device)
    bs = batch_size or spec.training.micro_batch_size
    stats = latent_stats_for(loaded).to("cpu")
    net = loaded.network(weights, device)
    out_dir = Path(out_dir)
    labels = {k: f"{weights}_nfe{k}" for k in nfes}
    paths = {k: sample_paths(out_dir, labels[k], n, save_volumes=save_volumes) for k in nfes}
    latents: dict[int, list[torch.Tensor]] = {k: [] for k in nfes}
    grid: dict[int, list[torch.Tensor]] = {k: [] for k in nfes}
    affine = np.eye(4)
    started = time.time()

    decoding = spec.vae.decoder != "identity"
    vae_ctx = loaded_vae(spec.vae, spec.paths.vae_weights, device) if decoding else nullcontext(None)
    with vae_ctx as vae:  # a missing or bad VAE fails here, before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=n, unit="sample", desc=f"sampling {weights}", disable=not progress, file=sys.stderr)
        for start, by_nfe in generate_batches(spec, net, n, list(nfes), seed, bs, device):
            for k, z in by_nfe.items():
                raw = stats.denormalise(z.float().cpu())
                latents[k].append(raw)
                volumes = decode_with(vae, raw, spec.vae, autocast_dtype(spec, device)) if decoding else raw
                if save_volumes:
                    keys = [key for key in paths[k] if key.startswith("sample_")][start : start + raw.shape[0]]
                    for i, key in enumerate(keys):
                        atomic_write_bytes(paths[k][key], nifti_bytes(volumes[i].numpy(), affine))
                if start < grid_n:
                    grid[k].append(volumes[: grid_n - start].clone())
            bar.update(next(iter(by_nfe.values())).shape[0])
    bar.close()
    del net

    for k in nfes:
        buffer = io.BytesIO()
        torch.save(torch.cat(latents[k]).contiguous(), buffer)
        atomic_write_bytes(paths[k]["latents"], buffer.getvalue())
        buffer = io.BytesIO()
        volume_grid(torch.cat(grid[k])).save(buffer, format="PNG")
        atomic_write_bytes(paths[k]["grid"], buffer.getvalue())
    info: dict[str, Any] = {
        "checkpoint": str(loaded.path.resolve()),
        "name": spec.name,
        "global_step": loaded.global_step,
        "epoch": loaded.epoch,
        "weights": weights,
        "nfe": list(nfes),
        "n": n,
        "seed": seed,
        "decoder": spec.vae.decoder,
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "files": {
            labels[k]: {key: p.name for key, p in paths[k].items() if not key.startswith("sample_")} for k in nfes
        },
    }
    atomic_write_text(out_dir / "sample_info.json", to_json(info))
    return {labels[k]: paths[k] for k in nfes}
