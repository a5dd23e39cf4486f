"""Pretrained feature extractors for image-space FID, built here and loaded from files the user stages.

Nothing is downloaded. Two published networks:

- `medicalnet3d`: a MedicalNet 3D ResNet (Tencent MedicalNet, e.g. `resnet_50_23dataset.pth`: a dict whose
  "state_dict" holds the weights with a "module." prefix). Built with MONAI's `monai.networks.nets.ResNet`
  (shortcut B, 7^3 stem with stride 2, no bias on the shortcut convolution, no classifier), as MONAI's own
  MedicalNet helpers do; then layer3 and layer4 are given MedicalNet's dilations (2 and 4, stride 1), which
  MONAI's ResNet does not build but which change no weight shape. The depth (10..200) and widths are read
  from the file, so any MedicalNet ResNet loads.
- `radimagenet2p5d`: the RadImageNet ResNet50 as converted from Keras by the `Warvito/radimagenet-models`
  hub repository (the file MAISI's 2.5D FID loads with torch.hub): a plain state dict with torchvision-like
  names (conv1, bn1, layer1..4, downsample.0/1; no fc) but Keras's structure: every convolution has a bias,
  the stride of a bottleneck sits on its first 1x1 convolution, BatchNorm eps 1.001e-5. MONAI's 2D ResNet
  has biasless convolutions and strides the 3x3 convolution, so it cannot hold these weights; the network is
  written out below (`KerasResNet`), and its key names are exactly those of the hub file.

A file that does not fit raises a one-line UserError listing the missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neuromf.errors import UserError
from neuromf.model.state_fit import load_fitting

__all__ = [
    "Extractor",
    "ExtractorKind",
    "KerasResNet",
    "load_extractor",
    "sha256_of",
    "medicalnet_state",
    "build_medicalnet",
]

ExtractorKind = Literal["medicalnet3d", "radimagenet2p5d"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Extractor:
    """A loaded feature network and where it came from."""

    kind: ExtractorKind
    net: nn.Module
    path: Path
    sha256: str
    description: str


# ---------------------------------------------------------------- RadImageNet ResNet50 (Keras layout)


class KerasBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)  # Keras strides the first 1x1
        self.bn1 = nn.BatchNorm2d(planes, eps=1.001e-5)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes, eps=1.001e-5)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(planes * 4, eps=1.001e-5)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class KerasResNet(nn.Module):
    """ResNet with Keras's bottleneck; `KerasResNet()` is the RadImageNet ResNet50 (stem 64, planes 64..512, [3, 4, 6, 3]).

    forward returns the last feature map (B, 4 * planes[-1], h, w), as the hub model does.
    """

    def __init__(
        self, stem: int = 64, planes: tuple[int, ...] = (64, 128, 256, 512), blocks: tuple[int, ...] = (3, 4, 6, 3)
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(stem, eps=1.001e-5)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem
        for i, (p, n) in enumerate(zip(planes, blocks)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != p * 4:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, p * 4, 1, stride=stride, bias=True), nn.BatchNorm2d(p * 4, eps=1.001e-5)
                )
            layer = [KerasBottleneck(inplanes, p, stride, down)] + [KerasBottleneck(p * 4, p) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = p * 4

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


# ---------------------------------------------------------------- MedicalNet (MONAI's ResNet)


def _layer_shape(state: Mapping[str, Tensor]) -> tuple[list[int], list[int], bool]:
    """(blocks per layer, planes per layer, bottleneck?) read from ResNet key names and shapes."""
    blocks, planes = [], []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        if not idx or f"layer{i}.0.conv1.weight" not in state:
            raise KeyError(f"layer{i}.0.conv1.weight")
        blocks.append(max(idx) + 1)
        planes.append(int(state[f"layer{i}.0.conv1.weight"].shape[0]))
    return blocks, planes, "layer1.0.conv3.weight" in state


def build_medicalnet(
    blocks: list[int], planes: list[int], bottleneck: bool, shortcut: str = "B", bias_downsample: bool = False
) -> nn.Module:
    """MONAI's 3D ResNet in MedicalNet's configuration (see the module docstring), random weights.

    shortcut "B" (a 1x1x1 convolution + BatchNorm: MedicalNet 10, 50 and deeper) or "A" (pooling and zero
    channels: MedicalNet 18 and 34), as MONAI's `get_medicalnet_pretrained_resnet_args` says; the loader reads
    which one from the file (downsample keys present or not).
    """
    from functools import partial

    from monai.networks.nets.resnet import ResNet

    net = ResNet(
        block="bottleneck" if bottleneck else "basic",
        layers=blocks,
        block_inplanes=planes,
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut,
        feed_forward=False,
        bias_downsample=bias_downsample,
    )
    for name, dilation in (("layer3", 2), ("layer4", 4)):  # MedicalNet: stride 1 and dilation instead of stride 2
        for block in getattr(net, name):
            for conv in [block.conv2] if bottleneck else [block.conv1, block.conv2]:
                conv.stride, conv.dilation, conv.padding = (1, 1, 1), (dilation,) * 3, (dilation,) * 3
            # Without the stride a shortcut is needed only where the channels change (as MedicalNet builds it).
            if isinstance(block.downsample, nn.Sequential):
                conv = block.downsample[0]
                block.downsample[0].stride = (1, 1, 1)
                if conv.in_channels == conv.out_channels:
                    block.downsample = None
            elif isinstance(block.downsample, partial):
                if block.conv1.in_channels == block.downsample.keywords["planes"]:
                    block.downsample = None
                else:
                    block.downsample = partial(block.downsample.func, **{**block.downsample.keywords, "stride": 1})
    return net


class MedicalNetFeatures(nn.Module):
    """The MedicalNet trunk: conv1 .. layer4, no pooling (the caller averages), keys as in MedicalNet's files."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def medicalnet_state(obj: Any) -> dict[str, Tensor]:
    """The weights of a MedicalNet file: under "state_dict" (or plain), "module." removed, segmentation head dropped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(type(obj).__name__)
    state = {str(k).removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    return {k: v for k, v in state.items() if not k.startswith("conv_seg.")}  # MedicalNet's segmentation decoder


# ---------------------------------------------------------------- loading


def _read(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # an old MedicalNet file may pickle more than tensors; the user named it, so a full unpickle is allowed
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--weights {path}: not a readable torch file ({type(e).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--weights {path}: not a readable torch file ({type(e).__name__})") from None


def load_extractor(kind: ExtractorKind, path: Path, device: torch.device | str = "cpu") -> Extractor:
    """Build the extractor `kind`, load `path` into it (eval mode, no gradients) and hash the file."""
    path = Path(path)
    obj = _read(path)
    if kind == "medicalnet3d":
        what = "MedicalNet 3D ResNet (a dict with 'state_dict', keys 'module.conv1.weight', 'module.layer1.0...')"
        try:
            state = medicalnet_state(obj)
            blocks, planes, bottleneck = _layer_shape(state)
        except (KeyError, TypeError) as e:
            raise UserError(f"--weights {path}: does not fit the {what}: no {e}") from None
        shortcut = "B" if any(".downsample.0." in k for k in state) else "A"
        bias_downsample = any(k.endswith(".downsample.0.bias") for k in state)
        net: nn.Module = MedicalNetFeatures(build_medicalnet(blocks, planes, bottleneck, shortcut, bias_downsample))
        depth = f"{'bottleneck' if bottleneck else 'basic'} blocks {blocks}, planes {planes}"
        description = f"MedicalNet 3D ResNet ({depth}; dilated layer3/layer4), global average of layer4"
    elif kind == "radimagenet2p5d":
        what = "RadImageNet ResNet50 (Warvito/radimagenet-models layout: 'conv1.weight', 'conv1.bias', 'layer1.0.conv1.bias', ...)"
        if not isinstance(obj, Mapping):
            raise UserError(
                f"--weights {path}: does not fit the {what}: the file holds a {type(obj).__name__}, not a state dict"
            )
        state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        try:
            blocks, planes, _ = _layer_shape(state)
            stem = int(state["conv1.weight"].shape[0])
        except KeyError as e:
            raise UserError(f"--weights {path}: does not fit the {what}: no {e}") from None
        net = KerasResNet(stem, tuple(planes), tuple(blocks))
        description = f"RadImageNet ResNet (Keras layout, blocks {blocks}, planes {planes}), spatial average of layer4"
    else:
        raise UserError(f"--features {kind}: unknown extractor")
    load_fitting(net, state, f"--weights {path}", f"the {what}")
    return Extractor(kind, net.to(device).eval().requires_grad_(False), path, sha256_of(path), description)
