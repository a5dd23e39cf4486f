"""Samples at the end of a training epoch: fixed noise -> 1- (and multi-) step samples -> de-normalise -> decode -> files.

The noise comes from `sampling.seed` every time, so the grids of different
epochs show the same draws evolving. The VAE is loaded once per epoch, for all
sample sets, and freed before training resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuromf.spec.schema import RunSpec


def fixed_noise(spec: RunSpec, device: torch.device) -> torch.Tensor:
    """The same (n_samples, C, D, H, W) noise for every epoch (drawn on the CPU: identical on every device)."""
    g = torch.Generator().manual_seed(spec.sampling.seed)
    shape = (spec.sampling.n_samples, spec.model.in_channels, *spec.model.spatial_size)
    return torch.randn(shape, generator=g).to(device)


def write_periodic_samples(
    spec: RunSpec, nets: dict[str, nn.Module], stats: Any, epoch: int, device: torch.device
) -> Path:
    """Samples of every (weights, nfe) pair the run-spec asks for, under samples/epoch_N/."""
    from neuromf.device import autocast_dtype
    from neuromf.meanflow.sampler import sample_for_run
    from neuromf.model.vae import decode_with, loaded_vae
    from neuromf.train.sample_files import epoch_sample_dir, write_sample_set

    noise = fixed_noise(spec, device)
    latents = {}
    for weights, net in nets.items():
        was_training = net.training
        net.eval()
        for nfe in spec.sampling.nfe:
            latents[f"{weights}_nfe{nfe}"] = stats.denormalise(sample_for_run(spec, net, noise, nfe)).cpu()
        net.train(was_training)

    if spec.vae.decoder == "identity":
        volumes = latents
    else:
        with loaded_vae(spec.vae, spec.paths.vae_weights, device) as vae:
            volumes = {
                label: decode_with(vae, z, spec.vae, autocast_dtype(spec, device)) for label, z in latents.items()
            }

    folder = epoch_sample_dir(spec.paths.run_dir, epoch)
    for label, z in latents.items():
        write_sample_set(folder, z, volumes[label], label=label, save_volumes=spec.sampling.save_volumes)
    return folder
