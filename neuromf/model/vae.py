"""The frozen MAISI VAE (NV-Generate-MR) that turns sample latents back into MRI volumes.

Only periodic samples and `neuromf sample` need it. It is built and loaded
when a decode starts and freed when it ends, so it never holds GPU memory
during training (docs/design.md, 'Outputs of a run'). The input of `decode_latents` is
DE-NORMALISED latents (the VAE encoder's scale, multiplied by the scale
factor as the diffusion model saw them); the decode undoes the scale factor:
`vae.decode(z / scale_factor)`.
"""

from __future__ import annotations

import gc
import logging
import pickle
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuromf.errors import UserError
from neuromf.model.state_fit import load_fitting
from neuromf.spec.schema import VAESpec

log = logging.getLogger(__name__)

Device = torch.device | str

# Keys under which checkpoints of MAISI and of common trainers keep the weights.
_STATE_DICT_KEYS = ("unet_state_dict", "state_dict", "autoencoder_state_dict", "model_state_dict")
# Prefixes that wrappers add to every key (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many keys an error lists.
_MAX_KEYS_SHOWN = 8


def build_vae(spec: VAESpec) -> nn.Module:
    """A MAISI `AutoencoderKlMaisi` with the NV-Generate-MR configuration, random weights, on CPU.

    Same architecture as NV-Generate-MR's `autoencoder_def` (3D, 1 channel in and
    out, no attention, norm_eps 1e-6, no checkpointing, upsampling by
    interpolation + conv) so its `autoencoder_v2.pt` loads. Two deliberate
    differences that change no weights: `norm_float16=False` (fp16 is never
    used here) and `save_mem=False` (MAISI's save_mem empties the CUDA cache
    after every layer, which is slow and not needed on a 40 GB GPU). The
    decode can be split into `spec.num_splits` pieces along dim 1 (MAISI's
    dim_split) to trade speed for memory.
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    levels = len(spec.num_channels)
    return AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=list(spec.num_res_blocks),
        num_channels=list(spec.num_channels),
        attention_levels=[False] * levels,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        norm_eps=1e-6,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        include_fc=False,
        use_combined_linear=False,
        use_flash_attention=False,
        use_checkpointing=False,
        use_convtranspose=False,
        num_splits=spec.num_splits,
        dim_split=1,
        norm_float16=False,
        print_info=False,
        save_mem=False,
    )


def _first_sentence(exc: BaseException) -> str:
    """A one-line summary of an exception (torch's load errors run to several paragraphs)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text.split('. ')[0][:200]}"


def _read_weights_file(weights: Path) -> Any:
    """torch.load the file on CPU, with weights_only=True when the file allows it.

    MAISI's VAE files hold plain tensors and load with weights_only=True. Some
    checkpoints also pickle Python objects (numpy scalars, config objects) that
    the safe loader refuses; for those we fall back to a full unpickle and say
    so, because the user named this file in the run-spec and trusts it. A
    corrupt or unreadable file is a UserError.
    """
    if not weights.is_file():
        raise UserError(f"paths.vae_weights: {weights} does not exist or is not a file")
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only a refused global means "valid file with extra Python objects"; other unpickling errors mean garbage.
        refused = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if not refused:
            raise UserError(
                f"paths.vae_weights: {weights} is not a readable torch file (corrupt or not a checkpoint)"
            ) from None
        log.warning(
            "%s holds Python objects beyond tensors, so weights_only=True refused it (%s); "
            "loading it with weights_only=False because the run-spec names it as trusted VAE weights",
            weights,
            refused[0][:200],
        )
    except Exception as exc:  # noqa: BLE001 - any other failure here means a bad file
        raise UserError(f"paths.vae_weights: {weights} is not a readable torch file ({_first_sentence(exc)})") from None
    try:
        return torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"paths.vae_weights: {weights} is not a readable torch file ({_first_sentence(exc)})") from None


def _extract_state_dict(obj: Any, weights: Path) -> dict[str, Tensor]:
    """The tensor dict inside what the file held: plain, or under "unet_state_dict"/"state_dict"."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(map(str, obj.keys()))[:_MAX_KEYS_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(
            f"paths.vae_weights: {weights} holds no state dict (expected a dict of tensors, plain or under "
            f"{' / '.join(repr(k) for k in _STATE_DICT_KEYS)}; found {found})"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_vae(spec: VAESpec, weights: Path, device: Device) -> nn.Module:
    """Build the VAE, load `weights` (strict), move it to `device`; eval mode, no gradients.

    The file may hold a plain state dict or one under "unet_state_dict" (MAISI's
    layout), "state_dict", "autoencoder_state_dict" or "model_state_dict";
    "module." / "_orig_mod." prefixes are removed. A missing, corrupt or
    mismatching file raises UserError naming the file and the offending keys.
    """
    weights = Path(weights)
    state = _extract_state_dict(_read_weights_file(weights), weights)
    vae = build_vae(spec)
    load_fitting(
        vae,
        state,
        f"paths.vae_weights: {weights}",
        "the VAE",
        hint="check vae.num_channels, num_res_blocks, latent_channels and norm_num_groups against the weights",
    )
    vae.eval().requires_grad_(False)
    return vae.to(device)


def free_vae(vae: nn.Module) -> None:
    """Release the VAE's memory now, even if the caller still holds a reference.

    Moving the parameters to the meta device drops their storage on any
    device; afterwards the module is an empty shell that fails loudly if used.
    """
    vae.to_empty(device="meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded_vae(spec: VAESpec, weights: Path | None, device: Device) -> Iterator[nn.Module]:
    """`with loaded_vae(spec, weights, device) as vae:` - the VAE for one block of decodes, freed on exit."""
    if weights is None:
        raise UserError("paths.vae_weights: not set, but vae.decoder is 'maisi' (set it, or use vae.decoder: identity)")
    started = time.perf_counter()
    vae = load_vae(spec, Path(weights), device)
    log.info("loaded the VAE from %s in %.1f s", weights, time.perf_counter() - started)
    try:
        yield vae
    finally:
        free_vae(vae)
        del vae


def decode_with(vae: nn.Module, latents: Tensor, spec: VAESpec, autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Decode de-normalised latents (B, C, D, H, W) with a loaded VAE: CPU float32 (B, 1, X, Y, Z).

    One sample at a time (a 4x48^3 latent becomes a 192^3 volume; activations,
    not weights, dominate the memory), `z / spec.scale_factor`, no gradients,
    under autocast at `autocast_dtype` (the run's, from neuromf.device.autocast_dtype: bf16 on a GPU
    unless the run is fp32; GroupNorm runs in fp32 inside MAISI's layers); None: fp32.
    """
    device = next(vae.parameters()).device
    out = []
    enabled = autocast_dtype is not None
    with (
        torch.no_grad(),
        torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled),
    ):
        for i in range(latents.shape[0]):
            z = latents[i : i + 1].to(device=device, dtype=torch.float32) / spec.scale_factor
            out.append(vae.decode(z).to(device="cpu", dtype=torch.float32))
            del z
    return torch.cat(out, dim=0)


def decode_latents(
    latents: Tensor, spec: VAESpec, weights: Path | None, device: Device, autocast_dtype: torch.dtype | None = None
) -> Tensor:
    """Decoded volumes (B, 1 or C, X, Y, Z), float32 on CPU, from DE-NORMALISED latents (B, C, D, H, W).

    vae.decoder "identity" returns the latents themselves (the demo: channel 0
    is already a T1 image). "maisi" loads the VAE from `weights`, decodes
    `z / spec.scale_factor` sample by sample, and frees the VAE before returning.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, D, H, W), got shape {tuple(latents.shape)}")
    if spec.decoder == "identity":
        return latents.detach().to(device="cpu", dtype=torch.float32)
    if latents.shape[1] != spec.latent_channels:
        raise UserError(
            f"vae.latent_channels: {spec.latent_channels}, but the latents have {latents.shape[1]} channels"
        )
    started = time.perf_counter()
    with loaded_vae(spec, weights, device) as vae:
        volumes = decode_with(vae, latents.detach(), spec, autocast_dtype)
    log.info(
        "decoded %d latents to %s in %.1f s", latents.shape[0], tuple(volumes.shape[1:]), time.perf_counter() - started
    )
    return volumes
