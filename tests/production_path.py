"""The production run-spec (runspecs/picasso.yaml) made to fit a 2-core CPU: the ONE list of overrides.

test_production.py runs `neuromf train runspecs/picasso.yaml` with these `--set`s on the host, and
test_container.py runs that same test inside the image. Every setting not listed here runs as shipped (wandb
offline, EMA, the schedule, the checkpoint policy, the shard, validation, samples decoded by a MAISI VAE), so a new
production setting is exercised by default. Keep this list as short as the CPU allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_SPEC = REPO / "runspecs" / "picasso.yaml"
MAX_STEPS = 12
N_LATENTS = 20  # 18 train (val_fraction 0.10) at batch 4: 4 steps per epoch, 3 epochs
LATENT_SHAPE = (4, 16, 16, 16)

# The tiny MAISI-layout VAE the test saves (2 levels: 4 x 16^3 latents decode to 1 x 32^3 volumes).
TINY_VAE = {"vae.num_channels": "[8,16]", "vae.num_res_blocks": "[1,1]", "vae.norm_num_groups": "4"}


def production_overrides(root: Path, compile_step: bool = False) -> list[str]:
    """`KEY=VALUE` pairs for `--set`. `root` holds the results and checkpoints roots (every path in the spec derives
    from these two, as on the cluster). `compile_step`: keep `training.compile: true` as shipped (minutes of a
    cold Inductor compile on a CPU: the image test does it, the host test does not)."""
    sets = {
        # where things are: the spec's own layout under two roots
        "paths.results_root": str(root / "results"),
        "paths.checkpoints_root": str(root / "checkpoints"),
        # a CPU: no GPU, no bf16 autocast there
        "hardware.device": "cpu",
        "hardware.num_threads": "1",
        "training.precision": "fp32",
        # a tiny network and latents
        "model.spatial_size": "[16,16,16]",
        "model.channels": "[8,16,32,64]",
        "model.num_head_channels": "[0,0,8,8]",
        "model.norm_num_groups": "4",
        "model.num_res_blocks": "1",
        **TINY_VAE,
        # a handful of steps, every periodic action inside them
        "training.batch_size": "4",
        "training.max_steps": str(MAX_STEPS),
        "training.warmup_steps": "2",
        "checkpoint.latest_every_n_steps": "2",
        "checkpoint.save_every_n_epochs": "1",
        "logging.log_every_n_steps": "1",
        "logging.val_every_n_epochs": "1",
        "logging.progress": "plain",
        "sampling.every_n_epochs": "1",
        "sampling.n_samples": "2",
    }
    if not compile_step:
        sets["training.compile"] = "false"
    return [f"{k}={v}" for k, v in sets.items()]


def set_args(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def write_production_inputs(root: Path) -> None:
    """What a user stages before the production run: the encoder's latents and the VAE weights, where the spec's
    paths point (results_root/latents, checkpoints_root/NV-Generate-MR/models/autoencoder_v2.pt)."""
    write_upstream_latents(root / "results" / "latents", N_LATENTS)
    write_tiny_maisi_vae(root / "checkpoints" / "NV-Generate-MR" / "models" / "autoencoder_v2.pt")


def write_upstream_latents(folder: Path, n: int) -> None:
    """The latents as the encoder writes them. Today: one `.pt` (C, D, H, W) tensor per volume in one folder, the
    format `data.latent_dir` reads (the trainer packs them into the shard the spec names)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        subject, session = i // 2, i % 2 + 1  # several sessions per subject, as in FOMO-60K
        latent = torch.randn(LATENT_SHAPE, generator=g) * 0.8 + 0.1
        torch.save(latent, folder / f"sub-{subject:03d}_ses-{session}.pt")


def write_tiny_maisi_vae(path: Path) -> None:
    """A randomly initialised MAISI autoencoder of TINY_VAE's size, saved in MAISI's own layout."""
    from neuromf.model.vae import build_vae
    from neuromf.spec.schema import VAESpec

    spec = VAESpec(decoder="maisi", num_channels=[8, 16], num_res_blocks=[1, 1], latent_channels=4, norm_num_groups=4)
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"unet_state_dict": build_vae(spec).state_dict()}, path)


def production_env(home: Path) -> dict[str, str]:
    """The trainer's environment: no WANDB_* or cache settings from the caller, and a $HOME that must stay empty."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "NEUROMF_", "SLURM_", "XDG_")) and k not in {"MPLCONFIGDIR"}
    }
    env.update(HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env
