"""Warm start from a (tiny) NV-Generate-MR-layout checkpoint: keys load, output preserved, mismatches named."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from imf_tiny import TINY, tiny_net
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.data.meta_tensor import MetaTensor
from monai.utils.enums import TraceKeys

from neuromf.errors import UserError
from neuromf.model.unet import perturb_zero_init
from neuromf.model.warm_start import load_pretrained_backbone


def released_layout_unet(**overrides: Any) -> DiffusionModelUNetMaisi:
    """A tiny DiffusionModelUNetMaisi configured like diff_unet_3d_rflow-mr.pt (spacing, 128 classes, include_fc)."""
    kwargs: dict[str, Any] = dict(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        num_res_blocks=TINY["num_res_blocks"],
        num_channels=TINY["channels"],
        attention_levels=TINY["attention_levels"],
        num_head_channels=TINY["num_head_channels"],
        norm_num_groups=TINY["norm_num_groups"],
        resblock_updown=True,
        include_fc=True,
        include_spacing_input=True,
        num_class_embeds=128,
    )
    kwargs.update(overrides)
    torch.manual_seed(7)
    unet = DiffusionModelUNetMaisi(**kwargs)
    perturb_zero_init(unet, std=0.05, generator=torch.Generator().manual_seed(8))
    return unet.eval()


def save_released_layout(path: Path, unet: DiffusionModelUNetMaisi) -> Path:
    """Same top-level layout as NVIDIA's file, including a MetaTensor scale_factor that needs weights_only=False."""
    scale_factor = MetaTensor(torch.tensor(0.96240234375, dtype=torch.float16))
    # its MONAI metadata (trace of applied transforms) holds MONAI enums the weights-only unpickler refuses
    scale_factor.push_applied_operation({TraceKeys.CLASS_NAME: "ScaleIntensity", TraceKeys.ID: 1})
    torch.save(
        {
            "epoch": 3,
            "loss": 1.2,
            "num_train_timesteps": 1000,
            "scale_factor": scale_factor,
            "unet_state_dict": unet.state_dict(),
            "optimizer_state_dict": {"state": {}, "param_groups": []},
        },
        path,
    )
    return path


def test_released_layout_loads_and_output_is_preserved(tmp_path: Path) -> None:
    ref = released_layout_unet()
    ckpt = save_released_layout(tmp_path / "diff_unet_3d_rflow-mr.pt", ref)
    with pytest.raises(pickle.UnpicklingError):  # the reason for weights_only=False in the loader
        torch.load(ckpt, weights_only=True)
    net = tiny_net(time_scale=1000.0)  # perturbed h MLP: the loader must zero it again
    load_pretrained_backbone(net, ckpt, spacing_mm=(1.0, 1.2, 0.9), class_label=29)
    assert not bool(net.h_embed[-1].weight.abs().sum()) and not bool(net.h_embed[-1].bias.abs().sum())

    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 4, 16, 16, 16), generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        expected = ref(
            x,
            timesteps=t * 1000,
            class_labels=torch.full((3,), 29, dtype=torch.long),
            spacing_tensor=torch.tensor([[1.0, 1.2, 0.9]]).repeat(3, 1) * 100,
        )
        ours_h0 = net(x, t, torch.zeros(3))
        ours_h = net(x, t, torch.tensor([0.1, 0.3, 0.7]))
    assert expected.abs().mean() > 1e-3  # a non-trivial function
    assert torch.allclose(ours_h0, expected, rtol=1e-4, atol=1e-5), (ours_h0 - expected).abs().max()
    assert torch.equal(ours_h0, ours_h)  # the zero h MLP keeps the output for every h
    # the folded constants matter: another class or spacing gives another function
    with torch.no_grad():
        other = ref(
            x,
            timesteps=t * 1000,
            class_labels=torch.full((3,), 9, dtype=torch.long),
            spacing_tensor=torch.tensor([[1.0, 1.2, 0.9]]).repeat(3, 1) * 100,
        )
    assert not torch.allclose(other, expected, rtol=1e-4, atol=1e-5)


def test_all_released_weights_are_used(tmp_path: Path) -> None:
    """Every tensor the file has either loads as is or is folded: no key of the file is dropped."""
    ref = released_layout_unet()
    net = tiny_net(time_scale=1000.0)
    load_pretrained_backbone(net, save_released_layout(tmp_path / "c.pt", ref))
    ours = net.unet.state_dict()
    for key, value in ref.state_dict().items():
        if key.startswith(("class_embedding.", "spacing_layer.")) or key.endswith(
            ("time_emb_proj.bias", "time_embed.2.bias")
        ):
            continue  # folded
        if key.endswith("time_emb_proj.weight"):
            value = value[:, : value.shape[1] // 2]
        assert torch.equal(ours[key], value), key


def test_plain_maisi_state_dict_loads_unchanged(tmp_path: Path) -> None:
    """A checkpoint without class/spacing inputs (e.g. our own backbone) loads key for key."""
    src = tiny_net(seed=3, time_scale=1000.0)
    path = tmp_path / "plain.pt"
    torch.save({"unet_state_dict": src.unet.state_dict()}, path)
    dst = tiny_net(seed=4, time_scale=1000.0)
    load_pretrained_backbone(dst, path)
    for (k, a), b in zip(src.unet.state_dict().items(), dst.unet.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrong_architecture_lists_the_offending_keys(tmp_path: Path) -> None:
    wider = released_layout_unet(num_channels=[8, 16, 32, 32])  # last level 32 instead of 64
    path = save_released_layout(tmp_path / "wider.pt", wider)
    with pytest.raises(UserError) as info:
        load_pretrained_backbone(tiny_net(time_scale=1000.0), path)
    (line,) = info.value.problems
    assert line.startswith("model.init_from") and "of the wrong shape" in line
    assert "down_blocks.3.attentions.0.attn.out_proj.bias (32,) vs (64,)" in line.split("of the wrong shape")[1]


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = released_layout_unet().state_dict()
    state.pop("conv_in.conv.weight")
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save({"unet_state_dict": state}, path)
    with pytest.raises(UserError) as info:
        load_pretrained_backbone(tiny_net(time_scale=1000.0), path)
    (line,) = info.value.problems
    assert "missing 1 key (conv_in.conv.weight)" in line
    assert "unexpected 1 key (extra_head.weight)" in line


def test_bad_files_are_user_errors(tmp_path: Path) -> None:
    net = tiny_net(time_scale=1000.0)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_backbone(net, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_pretrained_backbone(net, tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="no 'unet_state_dict'"):
        load_pretrained_backbone(net, tmp_path / "other.pt")
    with pytest.raises(UserError, match="init_class_label"):
        load_pretrained_backbone(net, save_released_layout(tmp_path / "c.pt", released_layout_unet()), class_label=128)
