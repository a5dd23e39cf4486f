"""Feature vectors of volumes for FID: the preprocessing each published extractor expects, then the network.

Every step follows the evaluation code of the extractor's users, cited in the README (Evaluation):

MedicalNet 3D (`medicalnet_features`): each volume (1, X, Y, Z) is z-scored over its voxels,
(v - mean) / (std + 1e-5) (`medicalnet_intensity_normalisation` in NV-Generate-CTMR's
scripts/compute_fid_2-5d_ct.py, as in MONAI GenerativeModels' 3D FID tutorial), passed whole (no resizing)
through the trunk, and the layer4 map averaged over space: one vector per volume.

RadImageNet 2.5D (`radimagenet_features`, NV-Generate-CTMR's `get_features_2p5d`): the single channel is
repeated to three and reordered RGB -> BGR; for each plane (xy: slices along the last axis, yz: along the
first, zx: along the second) all slices of a volume are stacked, min-max scaled to [0, 1] over that stack
(the volume's range), the ImageNet means [0.406, 0.456, 0.485] subtracted per (BGR) channel, passed at
native size through the network, and each map averaged over space: one vector per SLICE, pooled over all
volumes; FID is computed per plane and the three are averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["PLANES", "medicalnet_normalise", "medicalnet_features", "radimagenet_normalise", "radimagenet_features"]

PLANES = ("xy", "yz", "zx")
_BGR_MEANS = (0.406, 0.456, 0.485)  # subtract_mean() of compute_fid_2-5d_ct.py, on the BGR-ordered channels


def medicalnet_normalise(volume: Tensor) -> Tensor:
    """(B, 1, X, Y, Z) -> per-volume z-score, (v - mean) / (std + 1e-5); std with Bessel's correction as torch.std."""
    dims = tuple(range(2, volume.dim()))
    return (volume - volume.mean(dims, keepdim=True)) / (volume.std(dims, keepdim=True) + 1e-5)


@torch.no_grad()
def medicalnet_features(net: nn.Module, volumes: Tensor) -> dict[str, Tensor]:
    """{"3d": (B, F)} float64 on the CPU for volumes (B, 1, X, Y, Z), one volume at a time."""
    device = next(net.parameters()).device
    out = []
    for v in volumes:
        x = medicalnet_normalise(v[None, :1].to(device=device, dtype=torch.float32))
        out.append(net(x).mean(dim=(2, 3, 4)).double().cpu())
    return {"3d": torch.cat(out)}


def radimagenet_normalise(slices: Tensor) -> Tensor:
    """(S, 3, H, W) slices of one volume, BGR: min-max over the whole stack to [0, 1], then subtract the BGR means."""
    lo, hi = slices.min(), slices.max()
    x = (slices - lo) / (hi - lo + 1e-10)
    return x - torch.tensor(_BGR_MEANS, dtype=x.dtype, device=x.device)[None, :, None, None]


def _plane_slices(volume: Tensor, plane: str) -> Tensor:
    """(C, X, Y, Z) -> (S, C, ., .) the slices of one plane (compute_fid_2-5d_ct.py's unbind axes for (B, C, H, W, D))."""
    axis = {"xy": 3, "yz": 1, "zx": 2}[plane]
    return volume.movedim(axis, 0)


@torch.no_grad()
def radimagenet_features(net: nn.Module, volumes: Tensor, chunk: int = 256) -> dict[str, Tensor]:
    """{"xy", "yz", "zx": (B * slices, F)} float64 on the CPU for volumes (B, 1, X, Y, Z)."""
    device = next(net.parameters()).device
    out: dict[str, Tensor] = {}
    for plane in PLANES:
        stacks = []  # each volume's slices, normalised over that volume; then all volumes in chunks (rows volume-major)
        for v in volumes:
            rgb = v[:1].to(device=device, dtype=torch.float32).repeat(3, 1, 1, 1)[[2, 1, 0]]  # grey -> RGB -> BGR
            stacks.append(radimagenet_normalise(_plane_slices(rgb, plane)))
        out[plane] = torch.cat([net(part).mean(dim=(2, 3)).double().cpu() for part in torch.cat(stacks).split(chunk)])
    return out


def features_fn(kind: str, net: nn.Module) -> Callable[[Tensor], dict[str, Tensor]]:
    """The feature function of an extractor kind, on image volumes (B, 1, X, Y, Z)."""
    if kind == "medicalnet3d":
        return lambda v: medicalnet_features(net, v)
    if kind == "radimagenet2p5d":
        return lambda v: radimagenet_features(net, v)
    raise ValueError(kind)
