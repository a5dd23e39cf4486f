"""Tiny MAISI MeanFlow networks for the iMF tests (channels [8, 16, 32, 64], 1 res block, 16^3)."""

from __future__ import annotations

from typing import Any

import torch

from neuromf.model.unet import MeanFlowUNet, build_network, perturb_zero_init
from neuromf.spec.schema import ModelSpec

TINY: dict[str, Any] = dict(
    spatial_size=(16, 16, 16),
    channels=[8, 16, 32, 64],
    attention_levels=[False, False, True, True],
    num_head_channels=[0, 0, 16, 16],
    num_res_blocks=1,
    norm_num_groups=4,
)


def tiny_spec(**overrides: Any) -> ModelSpec:
    return ModelSpec(**{**TINY, **overrides})


def tiny_net(seed: int = 0, perturb: bool = True, dtype: torch.dtype = torch.float32, **overrides: Any) -> MeanFlowUNet:
    """A tiny network; `perturb` replaces MONAI's zero-initialised layers so outputs and derivatives are non-trivial."""
    torch.manual_seed(seed)
    net = build_network(tiny_spec(**overrides))
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        perturb_zero_init(net, std=0.05, generator=g)
    return net.to(dtype)
