"""Image-space FID extractors: files in the published layouts (tiny widths, random weights, saved here), their
preprocessing, FID/MMD against independent computations, MS-SSIM diversity against MONAI's metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from neuromf.errors import UserError
from neuromf.evaluation.extractors import KerasResNet, load_extractor
from neuromf.evaluation.image_features import medicalnet_features, radimagenet_features
from neuromf.evaluation.metrics import GaussianAccumulator, frechet_distance_of_fits, mmd2_rbf, ms_ssim_diversity

# ---------------------------------------------------------------- MedicalNet, written out as in its repository


class _MedBottleneck(nn.Module):
    """Tencent MedicalNet's Bottleneck (models/resnet.py): stride and dilation on the 3x3x3 convolution, no biases."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _MedicalNet(nn.Module):
    """MedicalNet's ResNet trunk with shortcut B: layer3/layer4 with stride 1 and dilation 2/4."""

    def __init__(self, planes: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, planes[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(planes[0])
        inplanes = planes[0]
        for i, (p, n, stride, dil) in enumerate(zip(planes, blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
            down = None
            if stride != 1 or inplanes != p * 4:
                down = nn.Sequential(nn.Conv3d(inplanes, p * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(p * 4))
            layers = [_MedBottleneck(inplanes, p, stride, dil, down)] + [
                _MedBottleneck(p * 4, p, 1, dil) for _ in range(1, n)
            ]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = p * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so a wrong BatchNorm mapping would show."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net.eval()


def save_medicalnet(
    path: Path, planes: tuple[int, ...] = (4, 4, 8, 8), blocks: tuple[int, ...] = (1, 2, 1, 1)
) -> _MedicalNet:
    """A tiny MedicalNet in its published file layout: {'state_dict': {'module.conv1.weight': ...}}."""
    torch.manual_seed(0)
    net = _randomise_bn(_MedicalNet(planes, blocks))
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net


def save_radimagenet(path: Path) -> KerasResNet:
    """A tiny RadImageNet ResNet in the hub file's layout: a plain state dict, biases on every convolution."""
    torch.manual_seed(1)
    net = _randomise_bn(KerasResNet(4, (2, 4, 4, 8), (1, 2, 1, 1)))
    torch.save(net.state_dict(), path)
    return net


def brains(n: int = 12, size: int = 16) -> torch.Tensor:
    """Smooth random blobs on a brain-like ellipsoid (B, 1, size^3): varied, structured volumes."""
    g = torch.Generator().manual_seed(3)
    r = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    mask = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 + (zz / 0.7) ** 2 < 1).float()
    noise = F.avg_pool3d(torch.randn(n, 1, size, size, size, generator=g), 5, stride=1, padding=2)
    return mask * (1.0 + 3.0 * noise) + 0.05 * torch.rand(n, 1, size, size, size, generator=g)


def _fid(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    values = []
    for plane in a:
        fits = []
        for f in (a[plane], b[plane]):
            acc = GaussianAccumulator()
            acc.add(f.numpy())
            fits.append(acc.fit())
        values.append(frechet_distance_of_fits(*fits[0], *fits[1]))
    return float(np.mean(values))


# ---------------------------------------------------------------- tests


def test_medicalnet_file_loads_into_monai_resnet_and_matches_medicalnet(tmp_path: Path) -> None:
    reference = save_medicalnet(tmp_path / "resnet_50_23dataset.pth")
    ex = load_extractor("medicalnet3d", tmp_path / "resnet_50_23dataset.pth")
    x = brains(2)
    with torch.no_grad():
        torch.testing.assert_close(ex.net(x), reference(x), rtol=1e-5, atol=1e-5)  # dilations and strides as MedicalNet
    assert len(ex.sha256) == 64 and "MedicalNet" in ex.description


def test_medicalnet_full_size_keys_are_medicalnets() -> None:
    from neuromf.evaluation.extractors import MedicalNetFeatures, build_medicalnet

    ours = MedicalNetFeatures(build_medicalnet([3, 4, 6, 3], [64, 128, 256, 512], True)).state_dict()
    theirs = _MedicalNet((64, 128, 256, 512), (3, 4, 6, 3)).state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert len(ours) == 318


def test_radimagenet_layout_is_the_hub_files() -> None:
    state = KerasResNet().state_dict()
    assert len(state) == 371  # 53 convolutions with bias, 53 BatchNorms, no fc
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "conv1.bias": (64,),
        "layer1.0.downsample.0.bias": (256,),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
    }.items():
        assert tuple(state[key].shape) == shape
    assert not any(k.startswith("fc.") for k in state)
    net = KerasResNet(4, (2, 4, 4, 8), (1, 1, 1, 1)).eval()
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)  # Keras: stride on the 1x1
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 2, 2)


@pytest.mark.parametrize("kind", ["medicalnet3d", "radimagenet2p5d"])
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_blur_and_noise(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    (save_medicalnet if kind == "medicalnet3d" else save_radimagenet)(path)
    net = load_extractor(kind, path).net  # type: ignore[arg-type]
    feats = medicalnet_features if kind == "medicalnet3d" else radimagenet_features
    x = brains(8)
    real = feats(net, x)
    assert set(real) == ({"3d"} if kind == "medicalnet3d" else {"xy", "yz", "zx"})
    if kind == "radimagenet2p5d":
        assert real["xy"].shape[0] == 8 * 16  # one row per slice
    same = _fid(real, real)
    blurred = _fid(real, feats(net, F.avg_pool3d(x, 3, stride=1, padding=1)))
    more_blurred = _fid(real, feats(net, F.avg_pool3d(x, 5, stride=1, padding=2)))
    noisy = _fid(real, feats(net, x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))))
    assert same < 1e-6 * max(blurred, 1e-12)
    assert 0 < blurred < more_blurred and noisy > 0


def test_wrong_file_gives_one_line(tmp_path: Path) -> None:
    save_radimagenet(tmp_path / "radimagenet.pt")
    save_medicalnet(tmp_path / "medicalnet.pth")
    with pytest.raises(UserError) as e:
        load_extractor("medicalnet3d", tmp_path / "radimagenet.pt")
    assert len(e.value.problems) == 1 and "unexpected" in e.value.problems[0] and "conv1.bias" in e.value.problems[0]
    with pytest.raises(UserError) as e:
        load_extractor("radimagenet2p5d", tmp_path / "medicalnet.pth")
    assert len(e.value.problems) == 1 and "does not fit the RadImageNet" in e.value.problems[0]
    state = torch.load(tmp_path / "radimagenet.pt")
    del state["layer3.0.bn2.running_mean"]
    state["conv1.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(UserError) as e:
        load_extractor("radimagenet2p5d", tmp_path / "damaged.pt")
    (line,) = e.value.problems
    assert "missing 1 key (layer3.0.bn2.running_mean)" in line and "conv1.bias (5,) vs (4,)" in line
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable torch file"):
        load_extractor("medicalnet3d", tmp_path / "garbage.pt")


def test_frechet_distance_of_batched_fits_matches_scipy_and_monai() -> None:
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    fits = []
    for x in (a, b):
        acc = GaussianAccumulator()
        for part in np.array_split(x, 7):
            acc.add(part)
        fits.append(acc.fit())
    ours = frechet_distance_of_fits(*fits[0], *fits[1])
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    scipy_value = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    monai_value = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(scipy_value, rel=1e-8) and ours == pytest.approx(monai_value, rel=1e-5)


def test_mmd_on_extractor_features_matches_a_double_loop(tmp_path: Path) -> None:
    save_medicalnet(tmp_path / "w.pth")
    net = load_extractor("medicalnet3d", tmp_path / "w.pth").net
    x = medicalnet_features(net, brains(6))["3d"].numpy()
    y = medicalnet_features(net, F.avg_pool3d(brains(6), 3, stride=1, padding=1))["3d"].numpy()
    s = float(np.median(np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(6, 1)]))

    def k(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.exp(-np.sum((p - q) ** 2) / (2 * s * s)))

    n = len(x)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    assert mmd2_rbf(x, y, [s])[s] == pytest.approx(xx + yy - 2 * xy, rel=1e-9, abs=1e-12)


def test_ms_ssim_diversity_matches_monai_pair_by_pair() -> None:
    from monai.metrics import MultiScaleSSIMMetric

    v = brains(4, size=32)
    got = ms_ssim_diversity(v)
    assert got["pairs"] == 6 and got["kernel_size"] == 11 and len(got["weights"]) == 2
    scaled = [(x - x.min()) / (x.max() - x.min()) for x in v]
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=11, weights=tuple(got["weights"]))
    pairs = [float(metric(scaled[i][None], scaled[j][None]).item()) for i in range(4) for j in range(i + 1, 4)]
    assert got["mean"] == pytest.approx(float(np.mean(pairs)), rel=1e-5)
    assert ms_ssim_diversity(torch.cat([v[:1]] * 3))["mean"] == pytest.approx(1.0, abs=1e-4)  # identical volumes: 1
