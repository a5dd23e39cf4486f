"""The MAISI VAE path: building, loading MAISI-layout weight files, decoding with the scale factor, freeing."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from neuromf.errors import UserError
from neuromf.model.vae import build_vae, decode_latents, decode_with, load_vae, loaded_vae
from neuromf.spec.schema import VAESpec

# Two levels: one 2x upsampling, so a 4 x 8^3 latent decodes to 1 x 16^3.
TINY = dict(decoder="maisi", num_channels=[8, 16], num_res_blocks=[1, 1], latent_channels=4, norm_num_groups=4)


@pytest.fixture
def spec() -> VAESpec:
    # A scale factor far from 1 makes a forgotten division visible.
    return VAESpec(**TINY, scale_factor=0.5)


@pytest.fixture
def state_dict(spec: VAESpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_vae(spec).state_dict()


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture
def maisi_file(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """Weights in MAISI's own layout: {"unet_state_dict": ...}."""
    return _save(tmp_path / "autoencoder.pt", {"unet_state_dict": state_dict})


def test_build_vae_is_the_nv_generate_mr_architecture() -> None:
    vae = build_vae(VAESpec())
    assert isinstance(vae, AutoencoderKlMaisi)
    n_params = sum(p.numel() for p in vae.parameters())
    assert abs(n_params - 20.9e6) < 0.1e6  # NV-Generate-MR's autoencoder_v2.pt has ~20.9 M parameters
    keys = vae.state_dict().keys()
    assert not any("attn" in k or "attention" in k for k in keys)
    assert vae.decoder.blocks[-1].conv.out_channels == 1


@pytest.mark.parametrize("layout", ["unet_state_dict", "state_dict", "plain", "ddp_prefix"])
def test_load_vae_reads_every_layout(tmp_path: Path, spec: VAESpec, state_dict: dict, layout: str) -> None:
    obj: object
    if layout == "plain":
        obj = state_dict
    elif layout == "ddp_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
    else:
        obj = {layout: state_dict, "epoch": 3}
    vae = load_vae(spec, _save(tmp_path / "w.pt", obj), "cpu")
    loaded = vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())


def test_decode_shape_and_scale_factor(spec: VAESpec, maisi_file: Path) -> None:
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, 8)
    volumes = decode_latents(latents, spec, maisi_file, "cpu")
    assert volumes.shape == (2, 1, 16, 16, 16)
    assert volumes.dtype == torch.float32 and volumes.device.type == "cpu"

    vae = load_vae(spec, maisi_file, "cpu")
    with torch.no_grad():
        expected = vae.decode(latents / spec.scale_factor)
        unscaled = vae.decode(latents)
    torch.testing.assert_close(volumes, expected, rtol=1e-5, atol=1e-5)
    assert (volumes - unscaled).abs().max() > 1e-2  # the division really happened


def test_decode_of_the_real_downsampling_factor(tmp_path: Path) -> None:
    """Three levels (as NV-Generate-MR) upsample 4x: a 4 x 6^3 latent becomes 1 x 24^3."""
    spec = VAESpec(**{**TINY, "num_channels": [4, 8, 8], "num_res_blocks": [1, 1, 1]})
    weights = _save(tmp_path / "w3.pt", build_vae(spec).state_dict())
    assert decode_latents(torch.randn(1, 4, 6, 6, 6), spec, weights, "cpu").shape == (1, 1, 24, 24, 24)


def test_key_mismatch_lists_the_keys(tmp_path: Path, spec: VAESpec, state_dict: dict) -> None:
    broken = dict(state_dict)
    dropped = "decoder.blocks.0.conv.conv.weight"
    assert dropped in broken
    del broken[dropped]
    broken["decoder.extra_layer.weight"] = torch.zeros(3)
    path = _save(tmp_path / "broken.pt", {"unet_state_dict": broken})
    with pytest.raises(UserError) as err:
        load_vae(spec, path, "cpu")
    (text,) = err.value.problems  # one line
    assert str(path) in text and dropped in text and "decoder.extra_layer.weight" in text


def test_wrong_architecture_names_shapes(tmp_path: Path, spec: VAESpec, maisi_file: Path) -> None:
    wider = VAESpec(**{**TINY, "num_channels": [8, 32]})
    with pytest.raises(UserError) as err:
        load_vae(wider, maisi_file, "cpu")
    assert "wrong shape" in str(err.value) and str(maisi_file) in str(err.value)


def test_missing_corrupt_or_foreign_files(tmp_path: Path, spec: VAESpec, maisi_file: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(UserError, match="nowhere.pt"):
        load_vae(spec, missing, "cpu")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(maisi_file.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated.pt.*not a readable torch file"):
        load_vae(spec, truncated, "cpu")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="garbage.pt"):
        load_vae(spec, garbage, "cpu")

    foreign = _save(tmp_path / "foreign.pt", {"epoch": 3, "lr": 0.1})
    with pytest.raises(UserError, match="foreign.pt holds no state dict"):
        load_vae(spec, foreign, "cpu")

    with pytest.raises(UserError, match="paths.vae_weights: not set"):
        decode_latents(torch.randn(1, 4, 8, 8, 8), spec, None, "cpu")


def test_file_with_python_objects_loads_with_a_warning(
    tmp_path: Path, spec: VAESpec, state_dict: dict, caplog: pytest.LogCaptureFixture
) -> None:
    # A numpy scalar beside the weights is refused by weights_only=True (as in MAISI's UNet checkpoints).
    path = _save(tmp_path / "with_numpy.pt", {"unet_state_dict": state_dict, "scale_factor": np.float64(0.96)})
    with caplog.at_level(logging.WARNING, logger="neuromf.model.vae"):
        vae = load_vae(spec, path, "cpu")
    assert "weights_only=False" in caplog.text and "with_numpy.pt" in caplog.text
    assert torch.equal(vae.state_dict()["post_quant_conv.conv.weight"], state_dict["post_quant_conv.conv.weight"])


def test_wrong_latent_channels_is_a_user_error(spec: VAESpec, maisi_file: Path) -> None:
    with pytest.raises(UserError, match="vae.latent_channels"):
        decode_latents(torch.randn(1, 3, 8, 8, 8), spec, maisi_file, "cpu")


def test_identity_decoder_returns_the_latents() -> None:
    latents = torch.randn(2, 4, 6, 6, 6)
    out = decode_latents(latents, VAESpec(decoder="identity"), None, "cpu")
    assert torch.equal(out, latents)
    as_double = decode_latents(latents.double(), VAESpec(decoder="identity"), None, "cpu")
    assert as_double.dtype == torch.float32 and torch.allclose(as_double, latents)


def _live_vaes() -> int:
    gc.collect()
    return sum(type(o) is AutoencoderKlMaisi for o in gc.get_objects())


def test_vae_is_freed_after_decoding(spec: VAESpec, maisi_file: Path) -> None:
    before = _live_vaes()
    decode_latents(torch.randn(1, 4, 8, 8, 8), spec, maisi_file, "cpu")
    assert _live_vaes() == before  # nothing keeps the decoder alive

    with loaded_vae(spec, maisi_file, "cpu") as vae:
        decode_with(vae, torch.randn(1, 4, 8, 8, 8), spec)
    # Even a reference the caller kept holds no memory: the weights are gone (meta device).
    assert all(p.device.type == "meta" for p in vae.parameters())
